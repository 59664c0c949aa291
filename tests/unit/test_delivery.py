"""Model delivery: the choice, the publish Job, its outcome, the Deployment it gives, and the reconcile
branches (published, still publishing, unfetchable model, a registry that refuses) with the fakes of
test_reconcile. tests/cluster/test_model_delivery.py runs the same path on the real node."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from tests.unit.test_reconcile import (
    CATALOG,
    DEPLOYMENT_PATH,
    NS,
    REFRESH_S,
    Clock,
    FakeApiServer,
    FakeMlflow,
    condition,
    create_model,
    reconcile,
    status,
)

from phi3_operator.builders import BuildContext, Owner, build_deployment
from phi3_operator.builders.common import MODEL_DIR
from phi3_operator.builders.delivery import (
    STARTUP_DEFAULT_FAILURES,
    STARTUP_PROBE_PERIOD_S,
    PublishRequest,
    choose_delivery,
    publish_job,
    publish_outcome,
    startup_failure_threshold,
)
from phi3_operator.reconcile import BUILD_POLL_S, DeploymentChanged, Reconciler
from phi3_operator.resolve import Resolver
from phi3_operator.settings import OperatorSettings
from phi3_operator.spec import parse_spec
from phi3_serving.publish import ImageName, _split_challenge, image_documents, write_layer

REGISTRY = "registry.local:5000"
PINNED = f"{REGISTRY}/phi3-models/phi3@sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("requested", "model_registry", "spec_registry", "minor", "mode"),
    [
        ("Auto", "", "", 36, "Download"),
        ("Auto", REGISTRY, "", 36, "ImageVolume"),
        ("Auto", REGISTRY, "", 34, "Download"),  # image volumes off by default before 1.35
        ("Auto", "", REGISTRY, 36, "Download"),  # a build registry alone does not opt a model in
        ("ImageVolume", "", REGISTRY, None, "ImageVolume"),
        ("Download", REGISTRY, "", 36, "Download"),
    ],
)
def test_the_delivery_choice(requested: str, model_registry: str, spec_registry: str, minor: int | None,
                             mode: str) -> None:
    choice = choose_delivery(requested, model_registry, spec_registry, minor, "Phi3 Mini")
    assert choice.mode == mode
    assert (choice.repository == f"{REGISTRY}/phi3-models/phi3-mini") == (mode == "ImageVolume")


def test_image_volume_without_any_registry_has_no_repository() -> None:
    assert choose_delivery("ImageVolume", "", "", None, "m").repository == ""


def request(**overrides: Any) -> PublishRequest:
    fields: dict[str, Any] = {"model_uri": "models:/phi3/3", "version": "3", "tracking_uri": "http://mlflow:5000",
                              "repository": f"{REGISTRY}/phi3-models/phi3", "namespace": NS,
                              "runtime_image": "runtime:cpu"}
    return PublishRequest(**{**fields, **overrides})


def test_a_version_has_one_tag_and_one_job_name_whoever_asks() -> None:
    assert request().image == request(namespace="other", runtime_image="x").image
    assert request().image.startswith(f"{REGISTRY}/phi3-models/phi3:v3-")
    assert request().tag != request(model_uri="models:/phi3/4", version="4").tag
    assert len(request().name) <= 63


def test_the_publish_job_is_restricted_and_passes_no_secret_in_arguments() -> None:
    job = publish_job(request(plain_http=True, credentials_secret="creds", push_secret="push"))
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "--plain-http" in container["command"] and container["envFrom"] == [{"secretRef": {"name": "creds"}}]
    assert {"name": "DOCKER_CONFIG", "value": "/etc/phi3-registry"} in container["env"]
    assert "ownerReferences" not in job["metadata"], "shared by every model serving the version"


def finished_pod(exit_code: int, message: str) -> dict[str, Any]:
    return {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": exit_code, "message": message}}}]}}


def job_with(condition_type: str) -> dict[str, Any]:
    job = publish_job(request())
    job["status"] = {"conditions": [{"type": condition_type, "status": "True", "reason": "x", "message": "m"}]}
    return job


def test_publish_outcomes() -> None:
    assert publish_outcome(None, []).state == "Missing"
    assert publish_outcome(publish_job(request()), []).state == "Publishing"
    result = json.dumps({"image": PINNED, "sizeBytes": 1234, "reused": False})
    published = publish_outcome(job_with("Complete"), [finished_pod(0, result)])
    assert (published.state, published.image, published.size_bytes) == ("Published", PINNED, 1234)
    unfetchable = publish_outcome(job_with("Failed"), [finished_pod(3, "log\nphi3-operator publish: cannot fetch x")])
    assert unfetchable.state == "Unfetchable" and unfetchable.message.endswith("cannot fetch x")
    assert publish_outcome(job_with("Failed"), [finished_pod(4, "refused")]).state == "RegistryFailed"
    assert publish_outcome(job_with("Complete"), []).state == "Failed", "no pod left to read the digest from"


def test_the_startup_budget_grows_with_the_model() -> None:
    assert startup_failure_threshold(0) == STARTUP_DEFAULT_FAILURES
    small, big = startup_failure_threshold(1_000_000), startup_failure_threshold(10_000_000_000)
    assert small < big and small * STARTUP_PROBE_PERIOD_S >= 120, "even a tiny model gets two minutes"
    assert big * STARTUP_PROBE_PERIOD_S <= 3600


def context(model_image: str = "", size: int = 0) -> BuildContext:
    spec = parse_spec({"model": {"uri": "models:/phi3/3"}, "hardware": {"target": "cpu"}})
    return BuildContext(owner=Owner("phi3", NS, "uid"), spec=spec, image="runtime:cpu", model_uri="models:/phi3/3",
                        tracking_uri="http://mlflow:5000", onnx_variant="cpu-int4", model_image=model_image,
                        model_size_bytes=size)


def test_an_image_volume_replaces_the_download() -> None:
    pod = build_deployment(context(PINNED, 2_000_000_000))["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert {"name": "models", "image": {"reference": PINNED, "pullPolicy": "IfNotPresent"}} in pod["volumes"]
    runtime = pod["containers"][0]
    assert {"name": "models", "mountPath": MODEL_DIR, "readOnly": True} in runtime["volumeMounts"]
    assert runtime["startupProbe"]["failureThreshold"] == startup_failure_threshold(2_000_000_000)


def test_a_downloaded_model_keeps_the_deployment_it_always_had() -> None:
    pod = build_deployment(context())["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["name"] == "fetch-model"
    assert {"name": "models", "emptyDir": {}} in pod["volumes"]
    startup = pod["containers"][0]["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] == 600, "ten minutes for a model of unknown size"
    # Startup waits for the model, not for the HTTP server (which answers /live while it loads).
    owner = context().owner.name
    assert startup["httpGet"]["path"] == f"/v2/models/{owner}/ready" and startup["periodSeconds"] == 1
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == f"/v2/models/{owner}/ready"


def test_the_layer_is_reproducible_and_leaves_out_the_fetch_marker(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "artifacts").mkdir(parents=True)
    (model / "MLmodel").write_text("flavors: {}\n")
    (model / "artifacts" / "w.bin").write_bytes(b"\x01" * 5000)
    (model / ".phi3-fetched.json").write_text("{}")
    first = write_layer(model, tmp_path / "a.tar")
    (model / "MLmodel").touch()  # a new mtime must not change the digest
    second = write_layer(model, tmp_path / "b.tar")
    assert first == second and first.digest == "sha256:" + hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert sorted(tar.getnames()) == ["MLmodel", "artifacts", "artifacts/w.bin"]
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_the_index_names_both_platforms_over_one_layer(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "MLmodel").write_text("x")
    layer = write_layer(tmp_path / "m", tmp_path / "l.tar")
    configs, manifests, (index_bytes, _) = image_documents(layer, "models:/m/1")
    index = json.load(io.BytesIO(index_bytes))
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]
    assert {json.loads(body)["layers"][0]["digest"] for body, _ in manifests} == {layer.digest}
    assert len({blob.digest for _, blob in configs}) == 2


def test_image_names_and_auth_challenges() -> None:
    name = ImageName.parse("10.88.0.1:5000/phi3-models/m:v1-abc")
    assert (name.registry, name.repository, name.tag) == ("10.88.0.1:5000", "phi3-models/m", "v1-abc")
    with pytest.raises(ValueError, match="registry host"):
        ImageName.parse("phi3-models/m:v1")
    assert _split_challenge('realm="https://a/token",service="r,1",scope="repository:m:pull"') == [
        'realm="https://a/token"', 'service="r,1"', 'scope="repository:m:pull"']


# The reconcile, with the fakes of test_reconcile and an operator that has a model registry.

@pytest.fixture
def api() -> FakeApiServer:
    server = FakeApiServer()
    server.objects["/version"] = {"major": "1", "minor": "36"}
    return server


@pytest.fixture
def reconciler(api: FakeApiServer) -> Reconciler:
    settings = OperatorSettings(model_refresh_interval_s=REFRESH_S, image_catalog=CATALOG, model_registry=REGISTRY)
    resolver = Resolver(lookup=FakeMlflow(), refresh_interval_s=REFRESH_S, clock=Clock())
    return Reconciler(api=api, settings=settings, resolver=resolver, clock=lambda: "2026-01-01T00:00:00Z")


def job_path(api: FakeApiServer) -> str:
    jobs = [path for path in api.objects if "/jobs/" in path]
    assert len(jobs) == 1
    return jobs[0]


def finish_job(api: FakeApiServer, condition_type: str, exit_code: int, message: str) -> None:
    path = job_path(api)
    api.objects[path]["status"] = {"conditions": [{"type": condition_type, "status": "True"}]}
    name = path.rsplit("/", 1)[1]
    api.objects[f"/api/v1/namespaces/{NS}/pods/{name}-x"] = finished_pod(exit_code, message)


def test_auto_publishes_once_then_mounts_the_image(reconciler: Reconciler, api: FakeApiServer) -> None:
    create_model(api)
    assert reconcile(reconciler, api) == BUILD_POLL_S
    assert DEPLOYMENT_PATH not in api.objects and condition(api, "ModelDelivered")["reason"] == "Publishing"
    assert reconcile(reconciler, api) == BUILD_POLL_S and job_path(api)
    finish_job(api, "Complete", 0, json.dumps({"image": PINNED, "sizeBytes": 600_000_000, "reused": False}))
    assert reconcile(reconciler, api) is None
    pod = api.objects[DEPLOYMENT_PATH]["spec"]["template"]["spec"]
    assert pod["volumes"][1]["image"]["reference"] == PINNED and "initContainers" not in pod
    assert status(api)["delivery"]["mode"] == "ImageVolume" and status(api)["delivery"]["image"] == PINNED
    del api.objects[job_path(api)]  # its TTL ran out: the status remembers the image
    deployment = copy.deepcopy(api.objects[DEPLOYMENT_PATH])
    assert reconcile(reconciler, api) is None and api.objects[DEPLOYMENT_PATH] == deployment
    assert not [path for path in api.objects if "/jobs/" in path], "published once, not again"


def test_a_model_that_cannot_be_fetched_is_a_terminal_condition(reconciler: Reconciler, api: FakeApiServer) -> None:
    create_model(api)
    reconcile(reconciler, api)
    finish_job(api, "Failed", 3, "phi3-operator publish: cannot fetch models:/phi3/1: RESOURCE_DOES_NOT_EXIST")
    assert reconcile(reconciler, api) is None, "waits for a person, no hot retry"
    delivered = condition(api, "ModelDelivered")
    assert delivered["reason"] == "ModelUnavailable" and "RESOURCE_DOES_NOT_EXIST" in delivered["message"]
    assert status(api)["phase"] == "Failed" and DEPLOYMENT_PATH not in api.objects


def test_auto_falls_back_to_downloading_when_the_registry_refuses(reconciler: Reconciler, api: FakeApiServer) -> None:
    create_model(api)
    reconcile(reconciler, api)
    finish_job(api, "Failed", 4, "phi3-operator publish: cannot push to registry.local:5000: HTTP 401")
    assert reconcile(reconciler, api) is None
    delivered = condition(api, "ModelDelivered")
    assert (delivered["status"], delivered["reason"]) == ("True", "PerPodDownload")
    assert "HTTP 401" in delivered["message"]
    assert api.objects[DEPLOYMENT_PATH]["spec"]["template"]["spec"]["initContainers"][0]["name"] == "fetch-model"


def test_explicit_image_volume_does_not_fall_back(reconciler: Reconciler, api: FakeApiServer) -> None:
    create_model(api, model={"uri": "models:/phi3@champion", "delivery": "ImageVolume"})
    reconcile(reconciler, api)
    finish_job(api, "Failed", 4, "phi3-operator publish: cannot push: HTTP 401")
    assert reconcile(reconciler, api) is None
    assert condition(api, "ModelDelivered")["reason"] == "PublishFailed" and status(api)["phase"] == "Failed"


def test_an_alias_move_held_by_publishing_is_announced_once(reconciler: Reconciler, api: FakeApiServer) -> None:
    create_model(api)
    reconcile(reconciler, api)
    finish_job(api, "Complete", 0, json.dumps({"image": PINNED, "sizeBytes": 1, "reused": False}))
    reconcile(reconciler, api)
    reconciler.resolver.lookup.version = 2  # type: ignore[attr-defined]
    reconciler.resolver.clock.now += REFRESH_S  # type: ignore[attr-defined]
    assert reconcile(reconciler, api) == BUILD_POLL_S, "the new version is being published"
    assert reconcile(reconciler, api) == BUILD_POLL_S
    changed = [e["message"] for e in api.events if e["reason"] == "ModelVersionChanged"]
    assert changed == ["rolling from models:/phi3/1 to models:/phi3/2"]


def test_a_rollout_keeps_the_delivery_in_the_status(reconciler: Reconciler, api: FakeApiServer) -> None:
    create_model(api)
    reconcile(reconciler, api)
    finish_job(api, "Complete", 0, json.dumps({"image": PINNED, "sizeBytes": 1, "reused": True}))
    reconcile(reconciler, api)
    api.roll_out()
    assert reconciler.handle((NS, "phi3"), DeploymentChanged(api.objects[DEPLOYMENT_PATH])) is None
    assert status(api)["phase"] == "Ready" and status(api)["delivery"]["image"] == PINNED


def test_a_completed_rollout_reports_its_pod_start_once(reconciler: Reconciler, api: FakeApiServer) -> None:
    create_model(api)
    reconcile(reconciler, api)
    finish_job(api, "Complete", 0, json.dumps({"image": PINNED, "sizeBytes": 1, "reused": True}))
    reconcile(reconciler, api)
    api.roll_out()
    api.objects[f"/api/v1/namespaces/{NS}/pods/phi3-abc"] = {
        "metadata": {"name": "phi3-abc", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:08Z"}]}}
    reconciler.handle((NS, "phi3"), DeploymentChanged(api.objects[DEPLOYMENT_PATH]))
    started = [e for e in api.events if e["reason"] == "PodReady"]
    assert len(started) == 1 and "Ready 8s after it was created" in started[0]["message"]
    assert "model delivery: ImageVolume" in started[0]["message"]
    assert status(api)["delivery"]["lastStartSeconds"] == 8.0
    writes = len(api.writes)
    assert reconcile(reconciler, api) is None
    reconciler.handle((NS, "phi3"), DeploymentChanged(api.objects[DEPLOYMENT_PATH]))
    assert len([e for e in api.events if e["reason"] == "PodReady"]) == 1, "once per rollout"
    assert len(api.writes) == writes, "a no-op pass writes nothing"
    # A rollout that never drops availability (maxUnavailable 0, as alias moves do) is reported too.
    api.objects[DEPLOYMENT_PATH]["metadata"]["generation"] += 1
    api.roll_out()
    reconciler.handle((NS, "phi3"), DeploymentChanged(api.objects[DEPLOYMENT_PATH]))
    assert len([e for e in api.events if e["reason"] == "PodReady"]) == 2
