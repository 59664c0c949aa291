"""Model URI resolution: from what the user wrote to one immutable model version, and what it needs.

Results are cached per (tracking URI, model URI) and refreshed on an interval, so an alias
that moves is noticed within one refresh.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))(?P<path>/.*)?$")
RUN_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)(?P<path>/.*)?$")


class ResolveError(Exception):
    """Resolution failed; `reason` is the condition reason, `retryable` says whether waiting helps."""

    def __init__(self, reason: str, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class ResolvedModel:
    uri: str
    name: str = ""
    version: str = ""
    run_id: str = ""
    flavor: str = "pyfunc"
    task: str = ""
    python_version: str = ""
    requirements: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()

    def as_status(self, requested_uri: str) -> dict[str, Any]:
        status: dict[str, Any] = {"requestedUri": requested_uri, "resolvedUri": self.uri, "flavor": self.flavor}
        for key, value in (("name", self.name), ("version", self.version), ("runId", self.run_id),
                           ("task", self.task), ("pythonVersion", self.python_version)):
            if value:
                status[key] = value
        if self.variants:
            status["variants"] = list(self.variants)
        return status

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> ResolvedModel:
        return cls(
            uri=str(status["resolvedUri"]),
            name=str(status.get("name", "")),
            version=str(status.get("version", "")),
            run_id=str(status.get("runId", "")),
            flavor=str(status.get("flavor", "pyfunc")),
            task=str(status.get("task", "")),
            python_version=str(status.get("pythonVersion", "")),
            variants=tuple(status.get("variants", ())),
        )


# A lookup goes to MLflow: (tracking_uri, model_uri, credentials) -> ResolvedModel.
Lookup = Callable[[str, str, Mapping[str, str]], ResolvedModel]


@dataclass
class _Entry:
    value: ResolvedModel
    fetched_at: float


@dataclass
class Resolver:
    lookup: Lookup
    refresh_interval_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _cache: dict[tuple[str, str], _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, tracking_uri: str, model_uri: str, credentials: Mapping[str, str]) -> ResolvedModel:
        key = (tracking_uri, model_uri)
        with self._lock:
            entry = self._cache.get(key)
        if entry is not None and self.clock() - entry.fetched_at < self.refresh_interval_s:
            return entry.value
        value = self.lookup(tracking_uri, model_uri, credentials)
        with self._lock:
            self._cache[key] = _Entry(value, self.clock())
        return value

    def forget(self, tracking_uri: str, model_uri: str) -> None:
        with self._lock:
            self._cache.pop((tracking_uri, model_uri), None)


# --------------------------------------------------------------------------- MLflow

ARTIFACT_URI = re.compile(r"^(s3://|gs://|https?://|file:|/)")
NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"}
CREDENTIAL_ENV = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
# MLflow reads credentials from the process environment, so lookups that set them take turns.
_mlflow_env_lock = threading.Lock()


def describe_mlmodel(mlmodel: Mapping[str, Any], requirements_text: str) -> dict[str, Any]:
    """Flavor, task, python version, requirements and ONNX variants from an MLmodel document."""
    flavors = mlmodel.get("flavors") or {}
    metadata = mlmodel.get("metadata") or {}
    pyfunc = flavors.get("python_function") or {}
    artifacts = pyfunc.get("artifacts") or {}
    task = str(metadata.get("task") or "")
    if "transformers" in flavors:
        flavor = "transformers"
        task = task or str(flavors["transformers"].get("task") or "")
    elif metadata.get("phi3_flavor") == "onnx-genai" or any("onnx" in str(k).lower() for k in artifacts):
        flavor = "onnx-genai"
    else:
        flavor = "pyfunc"
    requirements = tuple(
        line.strip()
        for line in requirements_text.splitlines()
        if line.strip() and not line.strip().startswith(("#", "-"))
    )
    return {
        "flavor": flavor,
        "task": task,
        "python_version": str(pyfunc.get("python_version") or ""),
        "requirements": requirements,
        "variants": tuple(str(v) for v in metadata.get("phi3_variants") or ()),
    }


class _CredentialEnv:
    def __init__(self, credentials: Mapping[str, str]) -> None:
        self.credentials = {k: v for k, v in credentials.items() if k in CREDENTIAL_ENV}
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        import os

        _mlflow_env_lock.acquire()
        for name in CREDENTIAL_ENV:
            self.saved[name] = os.environ.pop(name, None)
        os.environ.update(self.credentials)

    def __exit__(self, *exc: object) -> None:
        import os

        for name in CREDENTIAL_ENV:
            os.environ.pop(name, None)
            if self.saved.get(name) is not None:
                os.environ[name] = str(self.saved[name])
        _mlflow_env_lock.release()


def mlflow_lookup(tracking_uri: str, model_uri: str, credentials: Mapping[str, str]) -> ResolvedModel:
    import os

    # The MLflow client otherwise retries a dead server for minutes inside one reconcile.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.exceptions import MlflowException

    try:
        with _CredentialEnv(credentials):
            return _lookup(tracking_uri, model_uri)
    except MlflowException as error:
        code = str(getattr(error, "error_code", ""))
        message = str(getattr(error, "message", error)).splitlines()[0][:400]
        if code in NOT_FOUND_CODES or "not found" in message.lower() or "does not exist" in message.lower():
            raise ResolveError("ModelNotFound", f"{model_uri}: {message}", retryable=False) from None
        raise ResolveError("MLflowUnavailable", f"MLflow at {tracking_uri} failed: {message}", True) from None
    except (OSError, ConnectionError) as error:
        raise ResolveError("MLflowUnavailable", f"MLflow at {tracking_uri} is unreachable: {error}", True) from None


def _lookup(tracking_uri: str, model_uri: str) -> ResolvedModel:
    import tempfile

    import mlflow.artifacts
    import yaml
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name = version = run_id = ""
    registry = REGISTRY_URI.match(model_uri)
    run = RUN_URI.match(model_uri)
    if registry:
        name = registry["name"]
        if registry["alias"]:
            model_version = client.get_model_version_by_alias(name, registry["alias"])
        elif registry["version"] == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise ResolveError("ModelNotFound", f"registered model {name!r} has no versions", False)
            model_version = max(versions, key=lambda v: int(v.version))
        else:
            model_version = client.get_model_version(name, registry["version"])
        version, run_id = str(model_version.version), str(model_version.run_id or "")
        resolved_uri = f"models:/{name}/{version}"
        artifact_root = client.get_model_version_download_uri(name, version)
    elif run:
        run_id = run["run_id"]
        client.get_run(run_id)  # raises RESOURCE_DOES_NOT_EXIST for an unknown run
        resolved_uri = artifact_root = model_uri
    elif ARTIFACT_URI.match(model_uri):
        resolved_uri = artifact_root = model_uri
    else:
        raise ResolveError("InvalidModel", f"unsupported model URI {model_uri!r}", retryable=False)

    with tempfile.TemporaryDirectory(prefix="phi3-mlmodel-") as tmp:
        try:
            mlmodel_path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{artifact_root.rstrip('/')}/MLmodel", dst_path=tmp, tracking_uri=tracking_uri
            )
        except Exception as error:  # noqa: BLE001 - every store raises its own kind
            if "MlflowException" in type(error).__name__ or isinstance(error, OSError):
                raise ResolveError("InvalidModel", f"{resolved_uri} has no readable MLmodel: {error}", False) from None
            raise
        with open(mlmodel_path) as handle:
            mlmodel = yaml.safe_load(handle) or {}
        try:
            requirements_path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{artifact_root.rstrip('/')}/requirements.txt", dst_path=tmp, tracking_uri=tracking_uri
            )
            with open(requirements_path) as handle:
                requirements_text = handle.read()
        except Exception:  # noqa: BLE001 - a model without requirements.txt is valid
            requirements_text = ""
    described = describe_mlmodel(mlmodel, requirements_text)
    run_id = run_id or str(mlmodel.get("run_id") or "")
    return ResolvedModel(uri=resolved_uri, name=name, version=version, run_id=run_id, **described)
