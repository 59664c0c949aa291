"""Model URI resolution: from what the user wrote to one immutable model version, and what it needs.

Results are cached per (tracking URI, model URI) and refreshed on an interval, so an alias
that moves is noticed within one refresh.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

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
        "variants": tuple(str(v) for v in metadata.get("phi3_onnx_variants") or ()),
    }


class MlflowRest:
    """The few MLflow REST calls resolution needs, over the stdlib.

    Importing the mlflow package would cost the operator over 100 MB of memory for four GET requests;
    it is imported lazily only to read artifacts from stores that need its plugins (s3, gs, ...).
    """

    def __init__(self, tracking_uri: str, credentials: Mapping[str, str], timeout_s: float = 10.0) -> None:
        self.base = tracking_uri.rstrip("/")
        self.credentials = credentials
        self.timeout_s = timeout_s

    def _headers(self) -> dict[str, str]:
        import base64

        if self.credentials.get("MLFLOW_TRACKING_TOKEN"):
            return {"Authorization": f"Bearer {self.credentials['MLFLOW_TRACKING_TOKEN']}"}
        user = self.credentials.get("MLFLOW_TRACKING_USERNAME")
        password = self.credentials.get("MLFLOW_TRACKING_PASSWORD")
        if user and password:
            return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        return {}

    def fetch(self, url: str) -> bytes:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(url, headers={"Accept": "application/json", **self._headers()})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as error:
            raw = error.read()
            code, message = "", raw.decode(errors="replace")[:300]
            try:
                document = json.loads(raw)
                code, message = str(document.get("error_code", "")), str(document.get("message", message))
            except ValueError:
                pass
            if error.code == 404 or code in NOT_FOUND_CODES:
                raise ResolveError("ModelNotFound", message or f"{url} not found", retryable=False) from None
            if error.code in (401, 403):
                raise ResolveError("MLflowAccessDenied", f"MLflow at {self.base} refused the credentials "
                                   f"(HTTP {error.code})", retryable=True) from None
            raise ResolveError("MLflowUnavailable", f"MLflow at {self.base} answered HTTP {error.code}: {message}",
                               retryable=True) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ResolveError("MLflowUnavailable", f"MLflow at {self.base} is unreachable: {reason}", True) from None

    def api(self, path: str, **params: str) -> dict[str, Any]:
        from urllib.parse import urlencode

        document: dict[str, Any] = json.loads(self.fetch(f"{self.base}/api/2.0/mlflow/{path}?{urlencode(params)}"))
        return document

    def read_artifact(self, artifact_root: str, name: str) -> bytes:
        from urllib.parse import urlparse

        root = artifact_root.rstrip("/")
        parsed = urlparse(root)
        if parsed.scheme == "mlflow-artifacts":
            base = f"http://{parsed.netloc}" if parsed.netloc else self.base
            return self.fetch(f"{base}/api/2.0/mlflow-artifacts/artifacts{parsed.path}/{name}")
        if parsed.scheme in ("http", "https"):
            return self.fetch(f"{root}/{name}")
        if parsed.scheme in ("", "file"):
            from pathlib import Path
            from urllib.request import url2pathname

            path = Path(url2pathname(parsed.path)) / name
            try:
                return path.read_bytes()
            except OSError as error:
                raise ResolveError("InvalidModel", f"cannot read {path}: {error.strerror}", retryable=False) from None
        return self._read_with_mlflow(root, name)

    def _read_with_mlflow(self, root: str, name: str) -> bytes:
        import os
        import tempfile

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        import mlflow.artifacts

        with _mlflow_env_lock, _scoped_env(self.credentials), tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{name}", dst_path=tmp,
                                                            tracking_uri=self.base)
            except Exception as error:  # every artifact store raises its own kind
                raise ResolveError("MLflowUnavailable", f"cannot read {root}/{name}: {error}", True) from None
            with open(local, "rb") as handle:
                return handle.read()


class _scoped_env:  # noqa: N801 - used like a function
    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = {k: v for k, v in values.items() if k in CREDENTIAL_ENV}
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        import os

        for name in CREDENTIAL_ENV:
            self.saved[name] = os.environ.pop(name, None)
        os.environ.update(self.values)

    def __exit__(self, *exc: object) -> None:
        import os

        for name, value in self.saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def mlflow_lookup(tracking_uri: str, model_uri: str, credentials: Mapping[str, str]) -> ResolvedModel:
    rest = MlflowRest(tracking_uri, credentials)
    name = version = run_id = ""
    registry = REGISTRY_URI.match(model_uri)
    run = RUN_URI.match(model_uri)
    if registry:
        name = registry["name"]
        if registry["alias"]:
            model_version = rest.api("registered-models/alias", name=name, alias=registry["alias"])["model_version"]
        elif registry["version"] == "latest":
            found = rest.api("model-versions/search", filter=f"name='{name}'", max_results="1000")
            versions = found.get("model_versions") or []
            if not versions:
                raise ResolveError("ModelNotFound", f"registered model {name!r} has no versions", retryable=False)
            model_version = max(versions, key=lambda v: int(v["version"]))
        else:
            model_version = rest.api("model-versions/get", name=name, version=registry["version"])["model_version"]
        version, run_id = str(model_version["version"]), str(model_version.get("run_id") or "")
        resolved_uri = f"models:/{name}/{version}"
        artifact_root = rest.api("model-versions/get-download-uri", name=name, version=version)["artifact_uri"]
        if registry["path"]:
            artifact_root += registry["path"]
    elif run:
        run_id = run["run_id"]
        info = rest.api("runs/get", run_id=run_id)["run"]["info"]
        resolved_uri = model_uri
        artifact_root = str(info["artifact_uri"]).rstrip("/") + (run["path"] or "")
    elif ARTIFACT_URI.match(model_uri):
        resolved_uri = artifact_root = model_uri
    else:
        raise ResolveError("InvalidModel", f"unsupported model URI {model_uri!r}", retryable=False)

    try:
        mlmodel = yaml.safe_load(rest.read_artifact(artifact_root, "MLmodel")) or {}
    except ResolveError as error:
        if error.reason == "ModelNotFound":
            raise ResolveError("InvalidModel", f"{resolved_uri} has no MLmodel file (its artifacts were "
                               "deleted, or it is not an MLflow model)",
                               retryable=False) from None
        raise
    try:
        requirements_text = rest.read_artifact(artifact_root, "requirements.txt").decode()
    except ResolveError as error:
        if error.retryable:
            raise
        requirements_text = ""  # a model without requirements.txt is valid
    described = describe_mlmodel(mlmodel, requirements_text)
    run_id = run_id or str(mlmodel.get("run_id") or "")
    return ResolvedModel(uri=resolved_uri, name=name, version=version, run_id=run_id, **described)
