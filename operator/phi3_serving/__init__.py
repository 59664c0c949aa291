"""phi3-operator data plane: MLflow pyfunc wrappers and the MLServer runtime.

Commands (`phi3-operator package | serve | fetch`, see `cli`):
- `package onnx DIR` / `package transformers DIR` log, register and alias a model; the last
  stdout line is `models:/NAME/VERSION`.
- `fetch --model-uri URI --dest DIR` is the init container; `serve --model-uri DIR` the runtime.

Endpoints of `serve`: `/v1/chat/completions` and `/v1/completions` (with `stream: true` as SSE), `/v1/models`,
`/v2/models/<name>/infer` and `/infer_stream` (inputs `messages` or `prompt`, BYTES; options as
request parameters), `/invocations`, `/v2/health/{live,ready}`, and `/metrics` on the metrics port.

Environment of `serve`: PHI3_ONNX_VARIANT (e.g. cpu-int4; else the best one for the machine),
PHI3_MAX_TOKENS, PHI3_TEMPERATURE, PHI3_TOP_P, PHI3_TOP_K (request defaults), PHI3_ONNX_ENGINE
(`batch`: og.Engine, the default; `generator`: one og.Generator per request), PHI3_MAX_BATCH_SIZE
(the engine's batch, from spec.serving.maxBatchSize), PHI3_BATCH_WINDOW_MS, PHI3_SOLO_PATH (see
`batching`) and PHI3_MAX_CONCURRENCY (generations at once for the per-request engines, default 4).

MLmodel `metadata` written by `package` (read by the operator): `task`, `phi3_flavor`
(`onnx-genai` | `transformers`) and, for ONNX, `phi3_onnx_variants` and `phi3_context_length`.
"""
