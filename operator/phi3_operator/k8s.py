"""The one module that talks to the Kubernetes API.

Writes are server-side apply with one field manager, preceded by a read: an object whose
live state already holds everything we would apply is not written at all, so a reconcile
that changes nothing makes zero write calls (an SSA no-op is still a PATCH request).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import kubernetes
from kubernetes.client import ApiClient

from phi3_operator.settings import FIELD_MANAGER

logger = logging.getLogger(__name__)

PLURALS: dict[tuple[str, str], str] = {
    ("apps/v1", "Deployment"): "deployments",
    ("v1", "Service"): "services",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "Event"): "events",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("batch/v1", "Job"): "jobs",
    ("phi3.ai/v1alpha1", "Phi3Model"): "phi3models",
    ("coordination.k8s.io/v1", "Lease"): "leases",
    ("serving.knative.dev/v1", "Configuration"): "configurations",
    ("serving.knative.dev/v1", "Revision"): "revisions",
}


class KubeError(RuntimeError):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ObjectKey:
    api_version: str
    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> ObjectKey:
        meta = manifest["metadata"]
        return cls(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])

    def path(self, subresource: str = "") -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        plural = PLURALS[(self.api_version, self.kind)]
        return f"{prefix}/namespaces/{self.namespace}/{plural}/{self.name}" + (f"/{subresource}" if subresource else "")


def is_subset(desired: Any, live: Any) -> bool:
    """Does the live object already carry every value we would apply?

    Empty values we send compare equal to absent ones, because the API server drops them.
    """
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return not desired
        return all(is_subset(value, live.get(key)) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list):
            return not desired
        return len(desired) == len(live) and all(is_subset(d, v) for d, v in zip(desired, live, strict=True))
    if desired is None:
        return True
    if live is None:
        return desired in ({}, [], "")
    if isinstance(desired, bool) or isinstance(live, bool):
        return desired is live
    if isinstance(desired, (int, float)) and isinstance(live, (int, float)):
        return desired == live
    return str(desired) == str(live)


def new_api_client(identity: str = "") -> ApiClient:
    """A client from the in-cluster service account, else from KUBECONFIG / ~/.kube/config.

    Its User-Agent names the replica (`identity`), so the API server's audit log tells replicas apart."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = kubernetes.client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 32
    client = ApiClient(configuration)
    client.user_agent = f"{FIELD_MANAGER}/{version('phi3-operator')}" + (f" ({identity})" if identity else "")
    return client


THROTTLE_RETRIES = 3
THROTTLE_WAIT_MAX_S = 5.0


def retry_after_s(header: str | None) -> float:
    """The API server's Retry-After (whole seconds), bounded: a worker never sleeps long on one request."""
    try:
        return min(max(float(header or 1), 0.1), THROTTLE_WAIT_MAX_S)
    except ValueError:
        return 1.0


class KubeApi:
    def __init__(self, client: ApiClient, field_manager: str = FIELD_MANAGER) -> None:
        self.client = client
        self.field_manager = field_manager

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        method, url, headers, payload, _ = self.client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        for attempt in range(THROTTLE_RETRIES + 1):
            response = self.client.call_api(method, url, header_params=headers, body=payload, _request_timeout=30)
            data = response.read()  # type: ignore[no-untyped-call]
            if response.status != 429 or attempt == THROTTLE_RETRIES:
                break
            # API Priority and Fairness asks us to wait (Retry-After): client-go waits and retries itself, so a
            # throttled request is not a failed reconcile, a backoff and a status flip.
            time.sleep(retry_after_s(response.getheader("Retry-After")))  # type: ignore[no-untyped-call]
        if not 200 <= response.status < 300:
            detail = str(response.reason or "")
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                detail = str(json.loads(data).get("message", detail))
            raise KubeError(response.status, str(response.reason), detail)
        return json.loads(data) if data else None

    def get(self, key: ObjectKey) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._call("GET", key.path())
        except KubeError as error:
            if error.status == 404:
                return None
            raise
        return result

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "PATCH",
            ObjectKey.of(manifest).path(),
            body=dict(manifest),
            query=[("fieldManager", self.field_manager), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )
        return result

    def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """POST: fails with 409 when the object exists (leader election relies on it)."""
        collection = ObjectKey.of(manifest).path().rpartition("/")[0]
        result: dict[str, Any] = self._call("POST", collection, body=dict(manifest))
        return result

    def replace(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """PUT: with metadata.resourceVersion set, fails with 409 when the object changed since it was read."""
        result: dict[str, Any] = self._call("PUT", ObjectKey.of(manifest).path(), body=dict(manifest))
        return result

    def apply_if_changed(self, manifest: Mapping[str, Any], known_absent: bool = False) -> tuple[dict[str, Any], str]:
        """Apply only when the live object differs: (live object, "unchanged" | "created" | "updated").

        `known_absent` skips the read for an object that cannot exist yet.
        """
        if known_absent:
            return self.apply(manifest), "created"
        live = self.get(ObjectKey.of(manifest))
        if live is not None and is_subset(manifest, live):
            return live, "unchanged"
        return self.apply(manifest), "created" if live is None else "updated"

    def list_models(self, namespace: str | None = None, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every Phi3Model in `namespace`, or in the cluster, read a page at a time."""
        scope = f"/namespaces/{namespace}" if namespace else ""
        token = ""
        while True:
            query = [("limit", str(page_size))] + ([("continue", token)] if token else [])
            page = self._call("GET", f"/apis/phi3.ai/v1alpha1{scope}/phi3models", query=query)
            yield from page.get("items", [])
            token = page.get("metadata", {}).get("continue", "")
            if not token:
                return

    def list_pods(self, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        """The pods matching a label selector: read only when a model's Deployment is not available."""
        label_selector = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        page = self._call("GET", f"/api/v1/namespaces/{namespace}/pods", query=[("labelSelector", label_selector)])
        items: list[dict[str, Any]] = page.get("items", [])
        return items

    def server_minor(self) -> int | None:
        """The API server's minor version (36 for 1.36), or None when it does not say."""
        info = self._call("GET", "/version") or {}
        digits = re.match(r"\d+", str(info.get("minor", "")))
        return int(digits.group()) if digits else None

    def serves(self, api_version: str, kind: str) -> bool:
        """Does the API server serve this kind (its CRD is installed)? One discovery read."""
        try:
            found = self._call("GET", f"/apis/{api_version}") or {}
        except KubeError as error:
            if error.status == 404:
                return False
            raise
        return any(r.get("kind") == kind for r in found.get("resources", []))

    def delete(self, key: ObjectKey) -> bool:
        try:
            self._call("DELETE", key.path(), body={"propagationPolicy": "Background"})
        except KubeError as error:
            if error.status == 404:
                return False
            raise
        return True

    def patch_status(self, key: ObjectKey, status: Mapping[str, Any]) -> None:
        self._call(
            "PATCH", key.path("status"), body={"status": dict(status)}, content_type="application/merge-patch+json"
        )

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        """Decoded values of a Secret. Callers must never log them."""
        import base64

        secret = self.get(ObjectKey("v1", "Secret", namespace, name))
        if secret is None:
            raise KubeError(404, "NotFound", f'secret "{name}" not found in namespace "{namespace}"')
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def emit_event(
    api: KubeApi, involved: ObjectKey, *, uid: str, event_type: str, reason: str, message: str, now: str
) -> None:
    """Record an Event on `involved`; a failure to record is logged, never raised."""
    import uuid

    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{involved.name}.{uuid.uuid4().hex[:12]}", "namespace": involved.namespace},
        "involvedObject": {
            "apiVersion": involved.api_version,
            "kind": involved.kind,
            "name": involved.name,
            "namespace": involved.namespace,
            "uid": uid,
        },
        "type": event_type,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": FIELD_MANAGER},
        "reportingComponent": FIELD_MANAGER,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        api._call("POST", f"/api/v1/namespaces/{involved.namespace}/events", body=event)
    except KubeError as error:
        logger.warning("could not record event %s on %s/%s: %s", reason, involved.namespace, involved.name, error)
