-- Argo CD health check for phi3.ai/Phi3Model.
-- The message is the Ready condition's message. Register the check in argocd-cm under
-- resource.customizations.health.phi3.ai_Phi3Model (see the chart's README.md).
--   Healthy:     Ready=True and status.observedGeneration == metadata.generation
--   Degraded:    a terminal failure: Stalled=True, phase Failed, or Ready=False with a terminal reason
--   Progressing: anything else (work under way, a transient failure being retried), including a
--                missing status or a stale observedGeneration
-- TERMINAL_REASONS is the operator's table of reasons (operator/phi3_operator/status.py, kind
-- "terminal"); tests/unit/test_reasons.py fails when the two differ.
local hs = {status = "Progressing", message = "Waiting for the operator to reconcile the Phi3Model"}

local TERMINAL_REASONS = {
  BuildFailed = true,
  ChildRejected = true,
  CredentialsUnavailable = true,
  InvalidModel = true,
  InvalidSpec = true,
  MLflowAccessDenied = true,
  ModelNotFound = true,
  ModelRegistryRequired = true,
  ModelUnavailable = true,
  NoCompatibleImage = true,
  OOMKilled = true,
  PermissionDenied = true,
  ProgressDeadlineExceeded = true,
  PublishFailed = true,
  RegistryRequired = true,
  ModelLoadFailed = true,
  ApiKeysUnavailable = true,
  RuntimeCrashLoop = true,
  RevisionFailed = true,
}

if obj.status == nil then
  return hs
end

local ready = nil
local stalled = nil
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    elseif condition.type == "Stalled" then
      stalled = condition
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

local terminal = ready ~= nil and ready.status == "False" and TERMINAL_REASONS[ready.reason]
if obj.status.phase == "Failed" or (stalled ~= nil and stalled.status == "True") or terminal then
  hs.status = "Degraded"
  return hs
end

hs.status = "Progressing"
return hs
