"""The build plan is pure: Dockerfile, content-hash tag and Job from a request."""

from __future__ import annotations

from phi3_operator.builders.build import (
    BuildRequest,
    build_context_configmap,
    build_job,
    build_tag,
    job_outcome,
    label_value,
    render_dockerfile,
)

REQUEST = BuildRequest(
    base_image="ghcr.io/phi3-operator/mlserver-cpu:0.1.0",
    requirements=("scikit-learn==1.5.2", "mlflow==3.17.2"),
    registry="registry.example:5000/ml",
    namespace="llm",
    builder_image="moby/buildkit:v0.17.2-rootless",
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
