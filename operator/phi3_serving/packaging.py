"""`phi3-operator package`: log a model folder to MLflow, register it and optionally alias it.

Two flavors:
- onnx: an onnxruntime-genai folder (or a folder of variant folders) becomes an artifact of the
  `OnnxGenAIChatModel` pyfunc, logged from code (`onnx_model_entry.py`);
- transformers: a Hugging Face model folder is loaded into a text-generation pipeline and logged
  with `mlflow.transformers.log_model(task="llm/v1/chat")`.

The MLmodel `metadata` tells the operator what it needs without downloading the weights:
`task`, `phi3_flavor` and, for ONNX, `phi3_onnx_variants` and `phi3_context_length`.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from phi3_serving.variants import context_length, find_variants, read_genai_config

TASK = "llm/v1/chat"
ARTIFACT_PATH = "model"
ENTRY_FILE = Path(__file__).with_name("onnx_model_entry.py")


class PackagingError(Exception):
    """A problem the user can fix; the CLI prints it without a traceback."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    version: str
    run_id: str
    alias: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _pinned(*distributions: str) -> list[str]:
    pins = []
    for distribution in distributions:
        version = _version(distribution)
        pins.append(f"{distribution}=={version}" if version else distribution)
    return pins


def onnx_requirements() -> list[str]:
    # phi3-operator provides the pyfunc class the model's code names; the runtime images carry it.
    return _pinned("mlflow", "onnxruntime-genai", "phi3-operator")


def transformers_requirements() -> list[str]:
    # Explicit, because MLflow's inferred list imports torchvision and fails without it.
    return _pinned("mlflow", "transformers", "torch", "tokenizers", "safetensors")


def check_tracking_server(tracking_uri: str, timeout: float = 10.0) -> None:
    """Fail fast with a clear message instead of MLflow's minutes of retries."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https"):
        return  # sqlite:, databricks, file stores: MLflow reports those well itself
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status != 200:
                raise PackagingError(f"MLflow at {tracking_uri} is unhealthy (HTTP {response.status})")
    except urllib.error.HTTPError as error:
        # An auth proxy may guard /health; the server answered, which is what we check here.
        if error.code in (401, 403):
            return
        raise PackagingError(f"MLflow at {tracking_uri} is unhealthy (HTTP {error.code})") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise PackagingError(f"MLflow at {tracking_uri} is unreachable: {reason}") from error


def _configure_mlflow(tracking_uri: str | None) -> str:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise PackagingError("no MLflow tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _finish(name: str, model_info: Any, alias: str | None) -> PackagedModel:
    from mlflow import MlflowClient

    version = model_info.registered_model_version
    if version is None:
        raise PackagingError(f"MLflow logged the model but did not register it as {name!r}")
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, str(version))
    return PackagedModel(name=name, version=str(version), run_id=model_info.run_id, alias=alias)


def onnx_signature() -> Any:
    """Generation params only. An input schema would make MLflow reshape chat requests, so there is none;
    the params schema is what lets `predict(..., params={"max_tokens": 8})` reach the model."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(
        inputs=None,
        outputs=None,
        params=ParamSchema(
            [
                ParamSpec("max_tokens", "long", None),
                ParamSpec("temperature", "double", None),
                ParamSpec("top_p", "double", None),
                ParamSpec("top_k", "long", None),
                ParamSpec("stop", "string", [], (-1,)),
            ]
        ),
    )


def _onnx_model_arguments(model_dir: Path) -> dict[str, Any]:
    """What `log_model` and `save_model` get for an ONNX GenAI folder; raises PackagingError for a bad one."""
    try:
        variants = find_variants(model_dir)
    except ValueError as error:
        raise PackagingError(str(error)) from error
    first_config = read_genai_config(variants[0].path)
    return {
        "python_model": str(ENTRY_FILE),
        "artifacts": {"onnx_model": str(model_dir)},
        "pip_requirements": onnx_requirements(),
        "signature": onnx_signature(),
        "metadata": {
            "task": TASK,
            "phi3_flavor": "onnx-genai",
            "phi3_onnx_variants": [variant.name for variant in variants],
            "phi3_context_length": context_length(first_config),
        },
    }


def package_onnx(model_dir: Path, *, name: str, alias: str | None, tracking_uri: str | None,
                 extra_requirements: Sequence[str] = ()) -> PackagedModel:
    arguments = _onnx_model_arguments(Path(model_dir).resolve())
    arguments["pip_requirements"] = [*arguments["pip_requirements"], *extra_requirements]
    _configure_mlflow(tracking_uri)
    import mlflow

    with mlflow.start_run(run_name=f"package-{name}"):
        variants = ",".join(arguments["metadata"]["phi3_onnx_variants"])
        mlflow.log_params({"flavor": "onnx-genai", "variants": variants})
        model_info = mlflow.pyfunc.log_model(name=ARTIFACT_PATH, registered_model_name=name, **arguments)
    return _finish(name, model_info, alias)


def save_onnx_model(model_dir: Path, dest: Path) -> Path:
    """The same MLflow model `package onnx` logs, written to a local folder (no tracking server)."""
    arguments = _onnx_model_arguments(Path(model_dir).resolve())
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.pyfunc.save_model(path=str(dest), **arguments)
    return Path(dest)


def package_transformers(model_dir: Path, *, name: str, alias: str | None, tracking_uri: str | None,
                         extra_requirements: Sequence[str] = ()) -> PackagedModel:
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise PackagingError(f"{model_dir} is not a Hugging Face model folder: it has no config.json")
    # The Hub must never be asked about a local folder (MLflow does, and retries for ~50 s).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    _configure_mlflow(tracking_uri)
    import mlflow
    import transformers

    try:
        pipeline = transformers.pipeline("text-generation", model=str(model_dir), tokenizer=str(model_dir))
    except (OSError, ValueError) as error:
        raise PackagingError(f"{model_dir} could not be loaded as a text-generation model: {error}") from error
    if not getattr(pipeline.tokenizer, "chat_template", None):
        raise PackagingError(f"{model_dir} has no chat template; llm/v1/chat needs one")
    with mlflow.start_run(run_name=f"package-{name}"):
        mlflow.log_params({"flavor": "transformers"})
        model_info = mlflow.transformers.log_model(
            transformers_model=pipeline,
            name=ARTIFACT_PATH,
            task=TASK,
            pip_requirements=[*transformers_requirements(), *extra_requirements],
            metadata={"phi3_flavor": "transformers"},
            registered_model_name=name,
        )
    return _finish(name, model_info, alias)
