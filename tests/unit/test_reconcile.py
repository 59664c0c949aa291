"""The reconcile pass with fakes for the API server, MLflow and the clocks: each branch in milliseconds.

The fake API server stands in for HTTP only (`KubeApi._call`), so the real read-compare-apply logic,
status patches and Events all run. tests/cluster covers the same ground against a real control plane.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping
from typing import Any

import pytest

from phi3_operator.k8s import KubeApi, KubeError
from phi3_operator.reconcile import BUILD_POLL_S, DeploymentChanged, ModelChanged, ReconcileFailed, Reconciler
from phi3_operator.resolve import ResolvedModel, ResolveError, Resolver
from phi3_operator.settings import OperatorSettings, parse_catalog_entry

NS, NAME, UID = "llm", "phi3", "uid-1"
MODEL_PATH = f"/apis/phi3.ai/v1alpha1/namespaces/{NS}/phi3models/{NAME}"
DEPLOYMENT_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"
HPA_PATH = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/{NAME}"
REFRESH_S = 30.0
SECRET_VALUE = "s3cr3t-token-value"


class FakeApiServer(KubeApi):
    """Objects by path; apply replaces the object's spec, status patches merge, Events are kept."""

    def __init__(self) -> None:
        super().__init__(client=None)  # type: ignore[arg-type]
        self.objects: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.writes: list[tuple[str, str]] = []
        self.refuse: dict[tuple[str, str], KubeError] = {}  # (method, path) -> error

    def _call(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> Any:
        if (method, path) in self.refuse:
            raise self.refuse[(method, path)]
        if method != "GET":
            self.writes.append((method, path))
        if method == "GET" and path.endswith("/pods"):  # a list; the label selector matches every pod here
            return {"items": [copy.deepcopy(o) for p, o in self.objects.items() if p.startswith(path + "/")]}
        if method == "GET":
            if path not in self.objects:
                raise KubeError(404, "NotFound", f"{path} not found")
            return copy.deepcopy(self.objects[path])
        if method == "POST" and path.endswith("/events"):
            self.events.append(body)
            return body
        if method == "DELETE":
            if self.objects.pop(path, None) is None:
                raise KubeError(404, "NotFound", f"{path} not found")
            return {}
        if method == "PATCH" and path.endswith("/status"):
            self.objects[path.removesuffix("/status")].setdefault("status", {}).update(copy.deepcopy(body["status"]))
            return self.objects[path.removesuffix("/status")]
        if method == "PATCH":  # server-side apply
            live = self.objects.get(path)
            applied = copy.deepcopy(body)
            generation = 1 if live is None else live["metadata"]["generation"] + (live.get("spec") != body.get("spec"))
            applied["metadata"]["generation"] = generation
            applied["status"] = (live or {}).get("status", {})
            self.objects[path] = applied
            return copy.deepcopy(applied)
        raise AssertionError(f"unexpected call {method} {path}")

    def warnings(self) -> list[str]:
        return [e["reason"] for e in self.events if e["type"] == "Warning"]

    def roll_out(self) -> None:
        """What the Deployment controller would report once every replica is up."""
        deployment = self.objects[DEPLOYMENT_PATH]
        replicas = deployment["spec"].get("replicas", 1)
        deployment["status"] = {"observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
                                "updatedReplicas": replicas, "availableReplicas": replicas, "readyReplicas": replicas}


class FakeMlflow:
    """The lookup a Resolver calls: a version per URI, or an exception to raise."""

    def __init__(self) -> None:
        self.version = 1
        self.requirements: tuple[str, ...] = ()
        self.failure: Exception | None = None
        self.calls = 0

    def __call__(self, tracking_uri: str, model_uri: str, credentials: Mapping[str, str]) -> ResolvedModel:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return ResolvedModel(uri=f"models:/phi3/{self.version}", name="phi3", version=str(self.version),
                             flavor="onnx-genai", task="llm/v1/chat", requirements=self.requirements,
                             variants=("cpu-int4",))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CATALOG = (parse_catalog_entry({"flavor": "onnx-genai", "target": "cpu", "image": "runtime:cpu",
                                "packages": ["mlflow==3.17.2", "onnxruntime-genai==0.18.0"]}),)


@pytest.fixture
def api() -> FakeApiServer:
    return FakeApiServer()


@pytest.fixture
def mlflow() -> FakeMlflow:
    return FakeMlflow()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reconciler(api: FakeApiServer, mlflow: FakeMlflow, clock: Clock) -> Reconciler:
    settings = OperatorSettings(model_refresh_interval_s=REFRESH_S, image_catalog=CATALOG)
    resolver = Resolver(lookup=mlflow, refresh_interval_s=REFRESH_S, clock=clock)
    return Reconciler(api=api, settings=settings, resolver=resolver, clock=lambda: "2026-01-01T00:00:00Z")


def create_model(api: FakeApiServer, **spec: Any) -> None:
    api.objects[MODEL_PATH] = {
        "apiVersion": "phi3.ai/v1alpha1", "kind": "Phi3Model",
        "metadata": {"name": NAME, "namespace": NS, "uid": UID, "generation": 1},
        "spec": {"model": {"uri": "models:/phi3@champion"}, "hardware": {"target": "cpu"}, **spec},
        "status": {"observedGeneration": 0},  # what the CRD's default gives a model no one has reconciled
    }


def edit_spec(api: FakeApiServer, **spec: Any) -> None:
    model = api.objects[MODEL_PATH]
    model["spec"] = {**model["spec"], **spec}
    for key in [k for k, v in spec.items() if v is None]:
        del model["spec"][key]
    model["metadata"]["generation"] += 1


def status(api: FakeApiServer) -> dict[str, Any]:
    result: dict[str, Any] = api.objects[MODEL_PATH]["status"]
    return result


def condition(api: FakeApiServer, kind: str) -> dict[str, Any]:
    return next(c for c in status(api)["conditions"] if c["type"] == kind)


def reconcile(reconciler: Reconciler, api: FakeApiServer) -> float | None:
    """One pass as the work queue runs it, from the model as the API server holds it."""
    return reconciler.handle((NS, NAME), ModelChanged(copy.deepcopy(api.objects[MODEL_PATH])))


def serve(reconciler: Reconciler, api: FakeApiServer) -> None:
    """A model reconciled and rolled out: Ready."""
    assert reconcile(reconciler, api) is None
    api.roll_out()
    assert reconciler.handle((NS, NAME), DeploymentChanged(api.objects[DEPLOYMENT_PATH])) is None
    assert status(api)["phase"] == "Ready"


def test_a_new_model_gets_its_children_and_a_progressing_status(reconciler: Reconciler, api: FakeApiServer) -> None:
    assert reconcile(reconciler, api := _with_model(api)) is None
    assert DEPLOYMENT_PATH in api.objects and f"/api/v1/namespaces/{NS}/services/{NAME}" in api.objects
    assert status(api)["phase"] == "Deploying" and condition(api, "Reconciling")["status"] == "True"
    assert condition(api, "Stalled")["status"] == "False"
    assert [e["reason"] for e in api.events] == ["Applied"]


def test_a_served_model_reads_ready_and_a_second_pass_writes_nothing(reconciler: Reconciler,
                                                                     api: FakeApiServer) -> None:
    serve(reconciler, _with_model(api))
    assert condition(api, "Reconciling")["status"] == "False" and condition(api, "Stalled")["status"] == "False"
    api.writes.clear()
    assert reconcile(reconciler, api) is None
    assert api.writes == []


def test_an_mlflow_outage_keeps_the_last_version_and_polls_without_backoff(
    reconciler: Reconciler, api: FakeApiServer, mlflow: FakeMlflow, clock: Clock
) -> None:
    serve(reconciler, _with_model(api))
    deployment = copy.deepcopy(api.objects[DEPLOYMENT_PATH])
    mlflow.failure = ResolveError("MLflowUnavailable", "MLflow at http://mlflow:5000 is unreachable", True)
    clock.now += REFRESH_S  # the resolver's cache is stale: it asks MLflow again
    for _ in range(3):
        assert reconcile(reconciler, api) == REFRESH_S, "serving the last version is a planned wait"
    assert api.objects[DEPLOYMENT_PATH]["spec"] == deployment["spec"], "the serving Deployment is untouched"
    resolved = condition(api, "ModelResolved")
    assert resolved["reason"] == "MLflowUnavailable" and "still serving models:/phi3/1" in resolved["message"]
    assert status(api)["phase"] == "Pending" and condition(api, "Reconciling")["status"] == "True"
    assert api.warnings() == ["MLflowUnavailable"], "one Warning, not one per pass"
    mlflow.failure, mlflow.version = None, 2
    assert reconcile(reconciler, api) is None
    assert status(api)["model"]["resolvedUri"] == "models:/phi3/2"
    assert [e["reason"] for e in api.events][-2:] == ["ModelVersionChanged", "Applied"]


def test_an_mlflow_outage_before_anything_serves_is_a_failure_that_backs_off(
    reconciler: Reconciler, api: FakeApiServer, mlflow: FakeMlflow
) -> None:
    mlflow.failure = ResolveError("MLflowUnavailable", "MLflow at http://mlflow:5000 is unreachable", True)
    with pytest.raises(ReconcileFailed) as failed:
        reconcile(reconciler, _with_model(api))
    assert failed.value.ceiling_s == REFRESH_S
    assert DEPLOYMENT_PATH not in api.objects
    assert status(api)["phase"] == "Pending" and condition(api, "Ready")["reason"] == "MLflowUnavailable"


def test_an_unexpected_exception_becomes_a_condition_and_one_warning(
    reconciler: Reconciler, api: FakeApiServer, mlflow: FakeMlflow, clock: Clock
) -> None:
    api.objects[f"/api/v1/namespaces/{NS}/secrets/creds"] = {
        "data": {"MLFLOW_TRACKING_TOKEN": base64.b64encode(SECRET_VALUE.encode()).decode()}}
    create_model(api, model={"uri": "models:/phi3@champion", "credentialsSecretRef": {"name": "creds"}})
    # What json.loads raises on a 200 that is not JSON, with the secret where a careless message might put it.
    mlflow.failure = ValueError(f"Expecting value: line 1 column 1 (char 0) from http://bob:{SECRET_VALUE}@mlflow "
                                f"token={SECRET_VALUE}")
    for _ in range(3):
        with pytest.raises(ReconcileFailed):
            reconcile(reconciler, api)
        clock.now += REFRESH_S
    ready = condition(api, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ReconcileError"
    assert "ValueError: Expecting value" in ready["message"]
    assert SECRET_VALUE not in str(status(api)) and SECRET_VALUE not in str(api.events)
    assert "bob" not in ready["message"]
    assert api.warnings() == ["ReconcileError"], "one Warning Event for three failed passes"
    assert status(api)["phase"] == "Pending" and condition(api, "Reconciling")["status"] == "True"
    mlflow.failure = None
    assert reconcile(reconciler, api) is None
    assert condition(api, "Ready")["reason"] != "ReconcileError"


def test_a_missing_permission_is_named_in_a_terminal_condition(reconciler: Reconciler, api: FakeApiServer) -> None:
    message = ('deployments.apps "phi3" is forbidden: User "system:serviceaccount:ops:phi3-operator" cannot '
               'patch resource "deployments" in API group "apps" in the namespace "llm"')
    api.refuse[("PATCH", DEPLOYMENT_PATH)] = KubeError(403, "Forbidden", message)
    with pytest.raises(ReconcileFailed):
        reconcile(reconciler, _with_model(api))
    ready = condition(api, "Ready")
    assert ready["reason"] == "PermissionDenied" and 'cannot patch resource "deployments"' in ready["message"]
    assert status(api)["phase"] == "Failed" and condition(api, "Stalled")["status"] == "True"
    assert api.warnings() == ["PermissionDenied"]


def test_an_api_error_while_recording_the_failure_is_only_logged(reconciler: Reconciler, api: FakeApiServer) -> None:
    _with_model(api)
    api.refuse[("PATCH", DEPLOYMENT_PATH)] = KubeError(503, "ServiceUnavailable", "etcd is restarting")
    api.refuse[("PATCH", MODEL_PATH + "/status")] = KubeError(503, "ServiceUnavailable", "etcd is restarting")
    with pytest.raises(ReconcileFailed, match="503"):
        reconcile(reconciler, api)


def test_an_invalid_spec_is_terminal_and_not_retried(reconciler: Reconciler, api: FakeApiServer) -> None:
    create_model(api, replicas=-1)
    assert reconcile(reconciler, api) is None
    assert status(api)["phase"] == "Failed" and condition(api, "Stalled")["reason"] == "InvalidSpec"
    assert DEPLOYMENT_PATH not in api.objects


def test_a_build_holds_the_serving_deployment_and_is_polled_then_fails_terminally(
    reconciler: Reconciler, api: FakeApiServer, mlflow: FakeMlflow, clock: Clock
) -> None:
    serve(reconciler, _with_model(api))
    edit_spec(api, image={"registry": "registry.local:5000"})
    deployment = copy.deepcopy(api.objects[DEPLOYMENT_PATH])
    mlflow.version, mlflow.requirements = 2, ("scikit-learn==1.5",)
    clock.now += REFRESH_S
    assert reconcile(reconciler, api) == BUILD_POLL_S, "a running build is polled, not backed off"
    jobs = [path for path in api.objects if "/jobs/" in path]
    assert len(jobs) == 1 and api.objects[DEPLOYMENT_PATH] == deployment
    assert status(api)["phase"] == "Building" and condition(api, "Reconciling")["status"] == "True"
    assert reconcile(reconciler, api) == BUILD_POLL_S
    assert [path for path in api.objects if "/jobs/" in path] == jobs, "one Job for the image"
    api.objects[jobs[0]]["status"] = {"conditions": [{"type": "Failed", "status": "True",
                                                      "reason": "BackoffLimitExceeded", "message": "pip failed"}]}
    assert reconcile(reconciler, api) is None, "a failed build waits for a person"
    assert api.objects[DEPLOYMENT_PATH] == deployment, "the old version keeps serving"
    assert status(api)["phase"] == "Failed" and condition(api, "Stalled")["reason"] == "BuildFailed"
    assert api.warnings() == ["BuildFailed"]


def test_an_autoscaler_the_spec_no_longer_asks_for_is_pruned(reconciler: Reconciler, api: FakeApiServer) -> None:
    create_model(api, autoscaling={"minReplicas": 1, "maxReplicas": 3})
    assert reconcile(reconciler, api) is None
    assert HPA_PATH in api.objects
    edit_spec(api, autoscaling=None)
    assert reconcile(reconciler, api) is None
    assert HPA_PATH not in api.objects
    assert [e["reason"] for e in api.events][-1] == "Deleted"


def test_a_missing_credentials_secret_is_terminal(reconciler: Reconciler, api: FakeApiServer) -> None:
    create_model(api, model={"uri": "models:/phi3@champion", "credentialsSecretRef": {"name": "absent"}})
    with pytest.raises(ReconcileFailed):  # retried: the Secret may yet be created, and no event says so
        reconcile(reconciler, api)
    assert condition(api, "Ready")["reason"] == "CredentialsUnavailable"
    assert status(api)["phase"] == "Failed" and condition(api, "Stalled")["status"] == "True"


def test_deployment_progress_does_not_clear_a_failed_pass(reconciler: Reconciler, api: FakeApiServer,
                                                          mlflow: FakeMlflow, clock: Clock) -> None:
    serve(reconciler, _with_model(api))
    mlflow.failure = KeyError("model_version")
    clock.now += REFRESH_S
    with pytest.raises(ReconcileFailed):
        reconcile(reconciler, api)
    # A rollout event after the failure goes to a full reconcile, which meets the failure again.
    with pytest.raises(ReconcileFailed):
        reconciler.handle((NS, NAME), DeploymentChanged(api.objects[DEPLOYMENT_PATH]))
    assert condition(api, "Ready")["reason"] == "ReconcileError"


def _with_model(api: FakeApiServer) -> FakeApiServer:
    create_model(api)
    return api


def test_a_pod_oomkilled_at_its_limit_is_named_in_the_available_condition(
    reconciler: Reconciler, api: FakeApiServer
) -> None:
    create_model(api, resources={"limits": {"memory": "100Mi"}})
    reconcile(reconciler, api)
    namespace = api.objects[DEPLOYMENT_PATH]["metadata"]["namespace"]
    # The Deployment controller's word that the rollout has not moved for a while.
    api.objects[DEPLOYMENT_PATH]["status"] = {"observedGeneration": 1, "conditions": [
        {"type": "Progressing", "status": "True", "lastUpdateTime": "2020-01-01T00:00:00Z"}]}
    api.objects[f"/api/v1/namespaces/{namespace}/pods/m-1"] = {
        "metadata": {"name": "m-1", "namespace": namespace},
        "spec": {"containers": [{"name": "runtime", "resources": {"limits": {"memory": "100Mi"}}}]},
        "status": {"conditions": [{"type": "Ready", "status": "False"}],
                   "containerStatuses": [{"name": "runtime", "restartCount": 1,
                                          "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]},
    }
    reconcile(reconciler, api)
    available = condition(api, "Available")
    assert (available["status"], available["reason"]) == ("False", "OOMKilled")
    assert "memory limit 100Mi" in available["message"] and "pod m-1" in available["message"]
    assert status(api)["phase"] == "Failed"


def test_resync_puts_every_live_model_on_the_work_queue_and_reconciles_nothing_itself(
    reconciler: Reconciler, api: FakeApiServer
) -> None:
    import threading

    from phi3_operator.handlers import resync_loop

    bodies = [{"metadata": {"name": n, "namespace": NS, "uid": n, "generation": 1}, "spec": {}} for n in "ab"]
    bodies.append({"metadata": {"name": "going", "namespace": NS, "uid": "g", "deletionTimestamp": "t"}})
    api.list_models = lambda namespace=None: iter(bodies)  # type: ignore[method-assign]
    added: list[tuple[tuple[str, str], Any]] = []
    stop = threading.Event()

    class Queue:
        def add(self, key: tuple[str, str], work: Any) -> None:
            added.append((key, work))
            if len(added) == 2:
                stop.set()  # one pass is enough

        def waiting(self) -> int:
            return len(added)

    resync_loop(reconciler, Queue(), (), stop, interval_s=0.01)  # type: ignore[arg-type]
    assert [key for key, _ in added] == [(NS, "a"), (NS, "b")]
    assert all(isinstance(work, ModelChanged) and work.body is not None for _, work in added)
    assert api.writes == [], "the pass only queues: the work queue's workers reconcile"


def test_an_api_error_outside_a_pass_is_a_retry_not_a_crash(reconciler: Reconciler, api: FakeApiServer) -> None:
    from phi3_operator.workqueue import Retry

    api.refuse[("GET", MODEL_PATH)] = KubeError(503, "ServiceUnavailable", "etcd is restarting")
    with pytest.raises(Retry, match="503"):
        reconciler.handle((NS, NAME), ModelChanged())


# --------------------------------------------------------------------------- elastic serving (Knative)

CONFIGURATION_PATH = f"/apis/serving.knative.dev/v1/namespaces/{NS}/configurations/{NAME}"
KNATIVE_DISCOVERY = "/apis/serving.knative.dev/v1"


def revision(ready: str, active: str, actual: int, since: str = "2026-12-04T03:00:00Z") -> dict[str, Any]:
    return {"metadata": {"name": "phi3-00001"},
            "status": {"actualReplicas": actual, "desiredReplicas": actual,
                       "conditions": [{"type": "Ready", "status": ready, "reason": "X", "message": "why"},
                                      {"type": "Active", "status": active, "lastTransitionTime": since}]}}


def test_with_knative_the_model_is_a_configuration(reconciler: Reconciler, api: FakeApiServer) -> None:
    api.objects[KNATIVE_DISCOVERY] = {"resources": [{"kind": "Configuration"}, {"kind": "Revision"}]}
    create_model(api, autoscaling={"minReplicas": 0, "maxReplicas": 3})
    assert reconcile(reconciler, api) is not None, "a Knative model is looked at again: its scale is not watched"
    assert CONFIGURATION_PATH in api.objects and DEPLOYMENT_PATH not in api.objects
    assert condition(api, "ElasticServing")["reason"] == "Knative"
    assert condition(api, "ModelDelivered")["reason"] == "PerPodDownload"
    # Knative makes the Revision; it idles at zero.
    configuration = api.objects[CONFIGURATION_PATH]
    configuration["status"] = {"observedGeneration": 1, "latestCreatedRevisionName": "phi3-00001"}
    api.objects[f"{KNATIVE_DISCOVERY}/namespaces/{NS}/revisions/phi3-00001"] = revision("True", "False", 0)
    reconcile(reconciler, api)
    assert condition(api, "Available")["reason"] == "ScaledToZero" and status(api)["phase"] == "Ready"
    assert status(api)["idleSince"] == "2026-12-04T03:00:00Z"
    assert status(api)["endpoint"]["url"] == f"http://phi3-00001.{NS}.svc"


def test_without_knative_requests_per_replica_falls_back_to_the_hpa_and_says_so(
    reconciler: Reconciler, api: FakeApiServer
) -> None:
    create_model(api, autoscaling={"minReplicas": 0})
    assert reconcile(reconciler, api) is None
    assert DEPLOYMENT_PATH in api.objects and HPA_PATH in api.objects
    elastic = condition(api, "ElasticServing")
    assert (elastic["status"], elastic["reason"]) == ("False", "KnativeMissing")
    assert "need Knative Serving" in elastic["message"]
    api.roll_out()
    reconcile(reconciler, api)
    assert condition(api, "Ready")["status"] == "True", "an advisory condition does not hold Ready back"


def test_a_model_switched_to_knative_drops_its_deployment_once_the_revision_serves(
    reconciler: Reconciler, api: FakeApiServer
) -> None:
    create_model(api, autoscaling={"metric": "CPU"})
    reconcile(reconciler, api)
    api.roll_out()
    api.objects[KNATIVE_DISCOVERY] = {"resources": [{"kind": "Configuration"}]}
    reconciler._knative_seen.clear()  # installed since: the operator asks again within a minute
    model = api.objects[MODEL_PATH]
    model["spec"]["autoscaling"] = {"metric": "RequestsPerReplica"}
    model["metadata"]["generation"] += 1
    reconcile(reconciler, api)
    assert DEPLOYMENT_PATH in api.objects, "the Deployment serves until the Revision does"
    api.objects[CONFIGURATION_PATH]["status"] = {"observedGeneration": 1, "latestCreatedRevisionName": "phi3-00001"}
    api.objects[f"{KNATIVE_DISCOVERY}/namespaces/{NS}/revisions/phi3-00001"] = copy.deepcopy(
        revision("True", "True", 1))
    reconcile(reconciler, api)
    assert DEPLOYMENT_PATH not in api.objects and HPA_PATH not in api.objects


def test_a_failed_discovery_read_keeps_the_last_answer(reconciler: Reconciler, api: FakeApiServer) -> None:
    api.objects[KNATIVE_DISCOVERY] = {"resources": [{"kind": "Configuration"}]}
    assert reconciler.knative_installed()
    api.refuse[("GET", KNATIVE_DISCOVERY)] = KubeError(503, "ServiceUnavailable", "etcd is slow")
    reconciler._knative_seen[0] = (0.0, True)  # the answer is old: the next call asks again
    assert reconciler.knative_installed(), "an outage of discovery does not move a Knative model to a Deployment"
    reconciler._knative_seen.clear()
    with pytest.raises(KubeError):
        reconciler.knative_installed()
