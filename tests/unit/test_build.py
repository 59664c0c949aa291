"""The build plan is pure: Dockerfile, content-hash tag and Job from a request."""

from __future__ import annotations

import pytest

from phi3_operator.builders.build import (
    BuildRequest,
    build_context_configmap,
    build_job,
    build_tag,
    job_outcome,
    label_value,
    render_dockerfile,
)
from phi3_operator.settings import BUILD_ARGS, OperatorSettings

REQUEST = BuildRequest(
    base_image="ghcr.io/phi3-operator/mlserver-cpu:0.1.0",
    requirements=("scikit-learn==1.5.2", "mlflow==3.17.2"),
    registry="registry.example:5000/ml",
    namespace="llm",
    builder_image="moby/buildkit:v0.34.2-rootless",
    push_secret="push",
)


def test_tag_is_a_content_hash() -> None:
    assert build_tag("base", ["a", "b"]) == build_tag("base", ["b", "a", ""])
    assert build_tag("base", ["a"]) != build_tag("base", ["a==2"])
    assert build_tag("base", ["a"]) != build_tag("other", ["a"])
    assert build_tag("base", ["a"]) != build_tag("base", ["a"], "models:/m/1")
    assert len(REQUEST.tag) == 16
    assert REQUEST.name == f"phi3-build-{REQUEST.tag}"
    assert REQUEST.image == f"registry.example:5000/ml/phi3-model-runtime:{REQUEST.tag}"


def test_dockerfile_installs_requirements_and_ends_non_root() -> None:
    dockerfile = render_dockerfile(REQUEST)
    lines = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    assert lines[0] == f"FROM {REQUEST.base_image}"
    assert "pip install --no-cache-dir -r /tmp/phi3-requirements.txt" in dockerfile
    assert lines[-1] == "USER 1000:1000"
    assert "phi3-operator fetch" not in dockerfile


def test_dockerfile_can_bake_the_model() -> None:
    baked = BuildRequest(**{**REQUEST.__dict__, "bake_model_uri": "models:/m/3", "tracking_uri": "http://mlflow:5000"})
    dockerfile = render_dockerfile(baked)
    assert "RUN phi3-operator fetch --model-uri models:/m/3 --dest /models/model" in dockerfile
    assert baked.tag != REQUEST.tag


def test_context_and_job() -> None:
    context = build_context_configmap(REQUEST)
    assert context["data"]["requirements.txt"] == "mlflow==3.17.2\nscikit-learn==1.5.2\n"
    job = build_job(REQUEST)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["metadata"]["name"] == REQUEST.name
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert f"type=image,name={REQUEST.image},push=true" in container["args"]
    assert {"name": "push-secret", "mountPath": "/home/user/.docker", "readOnly": True} in container["volumeMounts"]
    assert job["metadata"]["labels"]["phi3.ai/registry"] == "registry.example-5000"


def test_job_outcome() -> None:
    job = {"metadata": {"name": "b", "annotations": {"phi3.ai/image": "r/i:t"}}, "status": {}}
    assert job_outcome(None)[0] == "Missing"
    assert job_outcome(job)[0] == "Building"
    done = {**job, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert job_outcome(done) == ("Built", "built r/i:t")
    failed = {**job, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                "message": "Job has reached the specified backoff limit"}]}}
    assert job_outcome(failed)[0] == "BuildFailed" and "BackoffLimitExceeded" in job_outcome(failed)[1]


def test_label_value() -> None:
    assert label_value("unreachable.invalid") == "unreachable.invalid"
    assert len(label_value("x" * 100)) == 63


def test_build_args_plain_http_registries_and_placement() -> None:
    request = BuildRequest(**{
        **REQUEST.__dict__,
        "base_image": "10.88.0.1:5000/phi3/mlserver-cpu@sha256:abc",
        "registry": "10.88.0.1:5000/built",
        "build_args": (("PIP_INDEX_URL", "http://10.88.0.1:8099/simple"), ("PIP_TRUSTED_HOST", "10.88.0.1:8099")),
        "plain_http_registries": ("10.88.0.1:5000", "10.88.0.1:5000"),
        "node_selector": {"phi3.ai/node": "real"},
        "tolerations": ({"key": "phi3.ai/node", "operator": "Exists", "effect": "NoSchedule"},),
    })
    dockerfile = render_dockerfile(request)
    for name in BUILD_ARGS:
        assert f"ARG {name}\n" in dockerfile
    context = build_context_configmap(request)
    assert context["data"]["buildkitd.toml"] == '[registry."10.88.0.1:5000"]\n  http = true\n'
    job = build_job(request)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[args.index("build-arg:PIP_INDEX_URL=http://10.88.0.1:8099/simple") - 1] == "--opt"
    assert "build-arg:PIP_TRUSTED_HOST=10.88.0.1:8099" in args
    flags = next(e["value"] for e in container["env"] if e["name"] == "BUILDKITD_FLAGS")
    assert flags == "--oci-worker-no-process-sandbox --config=/etc/phi3-build/buildkitd.toml"
    assert {"name": "buildkitd-config", "mountPath": "/etc/phi3-build", "readOnly": True} in container["volumeMounts"]
    # The build context is the Dockerfile and requirements only, never the daemon's config.
    context_volume = next(v for v in pod["volumes"] if v["name"] == "context")
    assert [i["key"] for i in context_volume["configMap"]["items"]] == ["Dockerfile", "requirements.txt"]
    assert pod["nodeSelector"] == {"phi3.ai/node": "real"} and pod["tolerations"][0]["key"] == "phi3.ai/node"


def test_https_registries_need_no_daemon_config() -> None:
    assert "buildkitd.toml" not in build_context_configmap(REQUEST)["data"]
    container = build_job(REQUEST)["spec"]["template"]["spec"]["containers"][0]
    assert next(e["value"] for e in container["env"] if e["name"] == "BUILDKITD_FLAGS") == \
        "--oci-worker-no-process-sandbox"
    assert not any(a.startswith("build-arg:") for a in container["args"])


def test_only_the_build_pod_may_map_users_and_it_keeps_no_other_capability() -> None:
    security = build_job(REQUEST)["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SETUID", "SETGID", "SETFCAP"]}
    assert security["allowPrivilegeEscalation"] is True
    assert security["seccompProfile"] == {"type": "Unconfined"}


def test_build_args_config_is_checked_against_the_dockerfile() -> None:
    settings = OperatorSettings.from_mapping(
        {"buildArgs": {"PIP_INDEX_URL": "http://index/simple", "PIP_CERT": ""}}, env={})
    assert settings.build_args == (("PIP_INDEX_URL", "http://index/simple"),)
    with pytest.raises(ValueError, match="HTTP_PROXY is not one of the build arguments"):
        OperatorSettings.from_mapping({"buildArgs": {"HTTP_PROXY": "http://proxy"}}, env={})
