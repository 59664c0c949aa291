-- Argo CD health check for phi3.ai/Phi3Model.
-- The message is the Ready condition's message. Register the check in argocd-cm under
-- resource.customizations.health.phi3.ai_Phi3Model (see the chart's README.md).
--   Healthy:     Ready=True and status.observedGeneration == metadata.generation
--   Degraded:    Ready=False with a reason that waiting will not fix, or phase Failed
--   Progressing: anything else, including a missing status or a stale observedGeneration
local hs = {status = "Progressing", message = "Waiting for the operator to reconcile the Phi3Model"}

local DEGRADED_REASONS = {
  BuildFailed = true,
  MLflowUnavailable = true,
  ModelNotFound = true,
  NoCompatibleImage = true,
  InvalidSpec = true,
  InvalidModel = true,
  ProgressDeadlineExceeded = true,
}

if obj.status == nil then
  return hs
end

local ready = nil
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    end
  end
end
if ready ~= nil and ready.message ~= nil then
  hs.message = ready.message
end

local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed ~= generation) then
  -- The status describes an older spec: whatever it says, the new one is still being rolled out.
  if ready == nil or ready.message == nil then
    hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  end
  hs.status = "Progressing"
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  return hs
end

if obj.status.phase == "Failed" or (ready ~= nil and ready.status == "False" and DEGRADED_REASONS[ready.reason]) then
  hs.status = "Degraded"
  return hs
end

hs.status = "Progressing"
return hs
