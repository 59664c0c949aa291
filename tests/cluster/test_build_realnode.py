"""The build path for real: a model whose requirements the runtime image lacks gets an image of its own,
built by rootless BuildKit in a Job on the real node and pushed to the local registry, and its pod
serves from that image.

No public BuildKit image can be pulled here, so the builder is `images/buildkit`, built from BuildKit's
and RootlessKit's Go modules (as an air-gapped mirror would have it). The extra requirement is a
package made by this test and served from a PEP 503 index on the bridge address, which the operator
hands to the build as `config.buildArgs`: the build needs nothing from outside the machine.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tests.support.cluster import Cluster
from tests.support.mlflow_server import free_port
from tests.support.operator import OperatorProcess, operator_with_config
from tests.support.realnode import (
    BRIDGE_ADDRESS,
    NODE_NAME,
    RealPath,
    build_images,
    catalog_packages,
    diagnose,
    model_manifest,
    ready_model,
    service_base_url,
    serving_pods,
)
from tests.support.wait import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROBE = "phi3-build-probe"
PROBE_MARKER = "installed by an in-cluster build"
BUILT_REGISTRY = f"{BRIDGE_ADDRESS}:5000/phi3-built"
MODEL = "needs-probe"


def probe_wheel(dest: Path) -> Path:
    """A pure-Python wheel, written by hand (no build backend, no download)."""
    module = "phi3_build_probe"
    dist_info = f"{module}-1.0.dist-info"
    files = {
        f"{module}/__init__.py": f"MARKER = {PROBE_MARKER!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: phi3-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = dest / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@contextlib.contextmanager
def package_index(root: Path) -> Iterator[tuple[str, Path]]:
    """A PEP 503 simple index holding the probe wheel, on the bridge address (pods reach it, nothing
    outside does); yields (index URL, access log)."""
    root.mkdir(parents=True, exist_ok=True)
    wheel = probe_wheel(root)
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    project = root / "simple" / PROBE
    project.mkdir(parents=True)
    (project / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="../../{wheel.name}#sha256={sha256}">{wheel.name}</a></body></html>\n')
    port = free_port()
    log = root / "index-access.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", BRIDGE_ADDRESS, "--directory",
                                   str(root), str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield f"http://{BRIDGE_ADDRESS}:{port}/simple/", log
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def build_operator(real_path: RealPath, operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[tuple[OperatorProcess, Path]]:
    """An operator whose catalog is the runtime image built here and whose builder is images/buildkit.
    The session's operator (it watches every namespace, with a catalog of images that exist nowhere)
    is stopped meanwhile."""
    builder = build_images("buildkit")["buildkit"]
    workdir = tmp_path_factory.mktemp("build-realnode")
    with contextlib.ExitStack() as stack:
        index_url, index_log = stack.enter_context(package_index(workdir / "index"))
        process = stack.enter_context(operator_with_config(operator, {
            "builderImage": builder,
            "buildArgs": {"PIP_INDEX_URL": index_url, "PIP_TRUSTED_HOST": index_url.split("/")[2]},
            "plainHttpRegistries": [f"{BRIDGE_ADDRESS}:5000"],
            "imageCatalog": [{"flavor": "onnx-genai", "target": "cpu", "image": real_path.images["mlserver-cpu"],
                              "packages": catalog_packages("mlserver-cpu")}],
        }, workdir))
        yield process, index_log


def build_pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = cluster.get("pods", namespace=namespace)["items"]
    return [p for p in pods if p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "image-build"]


def test_a_model_needing_a_package_is_built_by_rootless_buildkit_and_served_from_the_built_image(
    real_path: RealPath, build_operator: tuple[OperatorProcess, Path]
) -> None:
    operator, index_log = build_operator
    cluster, namespace = real_path.cluster, real_path.namespace
    uri = real_path.package(MODEL, requirements=(f"{PROBE}==1.0",))
    manifest = model_manifest(MODEL, uri, real_path.mlflow.tracking_uri, image={"registry": BUILT_REGISTRY})
    cluster.apply(manifest, namespace)

    def condition(kind: str) -> dict[str, Any]:
        obj = cluster.get("phi3", MODEL, namespace)
        return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})

    try:
        built = wait_until(lambda: (c := condition("ImageReady")).get("reason") in ("Built", "BuildFailed") and c,
                           timeout=1500, interval=5, message="the build Job to finish")
        assert built["reason"] == "Built", built
        obj = wait_until(lambda: ready_model(cluster, MODEL, namespace), timeout=600, interval=2,
                         message="the model to be Ready from the built image")
    except AssertionError as error:
        logs = "".join(cluster.kubectl("logs", "-n", namespace, p["metadata"]["name"], "--tail=60",
                                       check=False).stdout for p in build_pods(cluster, namespace))
        raise AssertionError(f"{error}\nbuild pod logs:\n{logs}\n{diagnose(cluster, namespace, operator)}") from None

    # The build ran on the real node, as UID 1000, and pip took the probe from the index on the bridge.
    [build_pod] = build_pods(cluster, namespace)
    job = cluster.get("job", build_pod["metadata"]["labels"]["job-name"], namespace)
    took = (datetime.fromisoformat(job["status"]["completionTime"].replace("Z", "+00:00"))
            - datetime.fromisoformat(job["status"]["startTime"].replace("Z", "+00:00"))).total_seconds()
    print(f"build Job {job['metadata']['name']}: {took:.0f}s from start to pushed image")
    assert build_pod["spec"]["nodeName"] == NODE_NAME
    assert build_pod["status"]["phase"] == "Succeeded"
    assert build_pod["spec"]["securityContext"]["runAsUser"] == 1000
    wheel_fetches = [line for line in index_log.read_text(errors="replace").splitlines()
                     if re.search(r'"GET /phi3_build_probe-1\.0-py3-none-any\.whl HTTP/[\d.]+" 200', line)]
    assert wheel_fetches, index_log.read_text()[-2000:]

    # The Deployment runs the pushed image; it carries the package; the model answers through the Service.
    image = obj["status"]["image"]
    assert image.startswith(f"{BUILT_REGISTRY}/phi3-model-runtime:"), image
    [pod] = serving_pods(cluster, MODEL, namespace)
    assert pod["spec"]["containers"][0]["image"] == image and pod["spec"]["nodeName"] == NODE_NAME
    runtime = pod["spec"]["containers"][0]["name"]
    marker = cluster.kubectl("exec", "-n", namespace, pod["metadata"]["name"], "-c", runtime,
                             "--", "python", "-c", "import phi3_build_probe; print(phi3_build_probe.MARKER)")
    assert marker.stdout.strip() == PROBE_MARKER

    from openai import OpenAI

    client = OpenAI(base_url=f"{service_base_url(cluster, MODEL, namespace)}/v1", api_key="unused", max_retries=2,
                    timeout=60)
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert answer.usage is not None and answer.usage.completion_tokens > 0
