"""Real-node pod start: how a model's pod comes up on the local cluster's real node (kubelet + containerd),
for the tiny model and the Phi-3-mini-shaped one, delivered two ways (issue 13, item 1: "Measure first").

    .venv/bin/python bench/realnode_start.py

- `Download`: the init container `fetch-model` downloads the model from MLflow into an emptyDir, in every pod;
- `ImageVolume`: the operator's publish Job pushes the model once as an OCI image to the node's registry and
  pods mount it as an image volume (no init container).

For each (model, delivery) a COLD and a WARM start. Download: cold = the first pod, warm = its replacement
after a delete (it downloads again). ImageVolume: cold = a pod after the model image was removed from the
node's containerd store (`ctr images rm`), warm = its replacement after a delete (image already on the node).

Phases are seconds from the pod's creation (the API's timestamps: whole seconds): scheduled, fetched
(Initialized), runtime_started, ready; plus the runtime's "Loaded model" log line (kubelet's timestamp,
sub-second) and the first token streamed through the Service's ClusterIP with the openai SDK. Machine limits
(disk write, loopback HTTP) are measured in the same run. Writes bench/results/realnode_start.json.

A host operator (watching only the bench's namespace), an MLflow server on the node bridge and a namespace
are started here and removed at the end.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "operator"))

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}.items():
    os.environ.setdefault(_key, _value)

from tests.cluster.test_model_delivery import blob_pulls  # noqa: E402
from tests.support.cluster import Cluster, localcluster  # noqa: E402
from tests.support.mlflow_server import MlflowServer, free_port  # noqa: E402
from tests.support.operator import OperatorProcess, install_crd, operator_env  # noqa: E402
from tests.support.realnode import (  # noqa: E402
    BRIDGE_ADDRESS,
    NODE_NAME,
    build_images,
    containerd_socket,
    ctr_binary,
    diagnose,
    model_manifest,
    pod_start_phases,
    service_base_url,
    serving_pods,
)
from tests.support.serving import package  # noqa: E402
from tests.support.tiny_model import CACHE_ROOT, PHI3_MINI_SHAPED, build_tiny_model, cache_key  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "realnode_start.json"
OPERATOR_CONFIG = REPO_ROOT / "tests" / "cluster" / "testdata" / "operator-config.yaml"
MODEL_REGISTRY = f"{BRIDGE_ADDRESS}:5000/phi3-bench"
GIB = 1 << 30
MB = 1e6
POD_TIMEOUT_S = 900


# ---------------------------------------------------------------------------------------------
# Machine limits


def disk_write_mbps(directory: Path) -> tuple[float, Path]:
    """1 GiB written with dd and fdatasync into `directory`; the file is kept for the loopback test."""
    target = directory / "disk-probe.bin"
    started = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={GIB // (4 << 20)}", "conv=fdatasync"],
                   check=True, capture_output=True)
    return GIB / MB / (time.monotonic() - started), target


def loopback_http_mbps(served: Path) -> float:
    """`served` (1 GiB) downloaded with urllib from a python http.server bound to the bridge address."""
    port = free_port(BRIDGE_ADDRESS)
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", BRIDGE_ADDRESS, "--directory",
                               str(served.parent), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://{BRIDGE_ADDRESS}:{port}/{served.name}"

        def up() -> bool:
            with urllib.request.urlopen(url.rsplit("/", 1)[0] + "/", timeout=2):
                return True

        wait_until(up, timeout=30, interval=0.2, message="http.server to listen")
        received = 0
        started = time.monotonic()
        with urllib.request.urlopen(url, timeout=120) as response:
            while chunk := response.read(1 << 20):
                received += len(chunk)
        elapsed = time.monotonic() - started
        assert received == served.stat().st_size, (received, served.stat().st_size)
        return received / MB / elapsed
    finally:
        server.terminate()
        server.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# The node's containerd


def ctr(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ctr_binary(), f"--address={containerd_socket(cluster)}", "-n", "k8s.io", *args],
                          text=True, capture_output=True, timeout=120)


def node_images(cluster: Cluster) -> list[tuple[str, str]]:
    """(name, target digest) for every image record in the node's k8s.io namespace."""
    listing = ctr(cluster, "images", "ls")
    rows = []
    for line in listing.stdout.splitlines()[1:]:
        fields = line.split()
        digest = next((f for f in fields if f.startswith("sha256:")), None)
        if fields and digest:
            rows.append((fields[0], digest))
    return rows


def remove_node_image(cluster: Cluster, ref: str) -> list[str]:
    """Every record that names `ref`'s manifest (its repo@digest name and the CRI's sha256:ID name)."""
    manifest = ref.split("@", 1)[1]
    names = [name for name, digest in node_images(cluster) if name == ref or digest == manifest]
    if names:
        # --sync: containerd's garbage collection runs before ctr returns, so the layer's content and its
        # snapshot go too (without it the next pull finds them and reads nothing from the registry).
        removed = ctr(cluster, "images", "rm", "--sync", *names)
        if removed.returncode != 0:
            raise AssertionError(f"ctr images rm {names} failed: {removed.stderr}")
    return names


# ---------------------------------------------------------------------------------------------
# One pod's start


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def is_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def wait_new_ready_pod(cluster: Cluster, name: str, namespace: str, exclude: set[str],
                       operator: OperatorProcess) -> tuple[dict[str, Any], float]:
    """The first pod of `name` not in `exclude` to be Ready, and the wall time this script saw it Ready."""

    def ready() -> dict[str, Any] | None:
        for pod in serving_pods(cluster, name, namespace):
            if pod["metadata"]["name"] not in exclude and not pod["metadata"].get("deletionTimestamp") \
                    and is_ready(pod):
                return pod
        return None

    try:
        pod = wait_until(ready, timeout=POD_TIMEOUT_S, interval=0.5, message=f"a new pod of {name} to be Ready")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(cluster, namespace, operator)}") from None
    return pod, time.time()


def first_token(cluster: Cluster, name: str, namespace: str) -> tuple[float, int]:
    """Wall time of the first streamed token through the Service, retrying while the endpoint is not routed yet."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{service_base_url(cluster, name, namespace)}/v1", api_key="unused",
                    max_retries=0, timeout=120)
    attempts = 0
    deadline = time.monotonic() + 120
    while True:
        attempts += 1
        try:
            stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello"}],
                                                    max_tokens=8, stream=True)
            at = None
            for chunk in stream:
                if at is None and chunk.choices and chunk.choices[0].delta.content:
                    at = time.time()
            if at is not None:
                return at, attempts
        except Exception:  # connection refused until kube-proxy routes the new endpoint
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def loaded_model_s(cluster: Cluster, pod: dict[str, Any], created: datetime) -> float | None:
    """Seconds from creation to the runtime's "Loaded model" log line, by kubelet's log timestamp."""
    logs = cluster.kubectl("logs", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"], "-c", "runtime",
                           "--timestamps", check=False).stdout
    for line in logs.splitlines():
        if "Loaded model" in line:
            stamp = line.split(" ", 1)[0]
            stamp = re.sub(r"(\.\d{6})\d*", r"\1", stamp)
            return round((_time(stamp) - created).total_seconds(), 3)
    return None


def measure(cluster: Cluster, name: str, namespace: str, exclude: set[str],
            operator: OperatorProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    pod, seen_ready = wait_new_ready_pod(cluster, name, namespace, exclude, operator)
    token_at, attempts = first_token(cluster, name, namespace)
    pod = cluster.get("pod", pod["metadata"]["name"], namespace)
    created = _time(pod["metadata"]["creationTimestamp"])
    phases: dict[str, Any] = dict(pod_start_phases(pod))
    phases["loaded_model"] = loaded_model_s(cluster, pod, created)
    phases["ready_seen_by_bench"] = round(seen_ready - created.timestamp(), 3)
    phases["first_token_after_ready_seen"] = round(token_at - seen_ready, 3)
    phases["first_token_from_creation"] = round(token_at - created.timestamp(), 3)
    runtime = next(s for s in pod["status"]["containerStatuses"] if s["name"] == "runtime")
    info = {"pod": pod["metadata"]["name"], "node": pod["spec"].get("nodeName"),
            "init_containers": [c["name"] for c in pod["spec"].get("initContainers", [])],
            "runtime_restarts": runtime["restartCount"], "stream_attempts": attempts}
    return pod, {"phases": phases, **info}


def delete_pod(cluster: Cluster, pod: dict[str, Any]) -> None:
    cluster.kubectl("delete", "pod", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"], "--wait=false")


def wait_no_pods(cluster: Cluster, name: str, namespace: str) -> None:
    wait_until(lambda: not serving_pods(cluster, name, namespace), timeout=180, interval=1,
               message=f"{name}'s pods to be gone")


def set_replicas(cluster: Cluster, name: str, namespace: str, replicas: int) -> None:
    cluster.kubectl("patch", "phi3", name, "-n", namespace, "--type=merge", "-p",
                    json.dumps({"spec": {"replicas": replicas}}))


def publish_job_s(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    jobs = cluster.get("jobs", namespace=namespace)["items"]
    out = []
    for job in jobs:
        status = job.get("status", {})
        if status.get("startTime") and status.get("completionTime"):
            seconds = (_time(status["completionTime"]) - _time(status["startTime"])).total_seconds()
        else:
            seconds = None
        out.append({"job": job["metadata"]["name"], "seconds": seconds, "succeeded": status.get("succeeded", 0)})
    return out


# ---------------------------------------------------------------------------------------------
# The benchmark


def run_case(cluster: Cluster, operator: OperatorProcess, namespace: str, runtime_image: str, mlflow: MlflowServer,
             model: str, uri: str, model_bytes: int, delivery: str) -> tuple[list[dict[str, Any]], list[str]]:
    name = f"{'tiny' if model == 'tiny' else 'mini'}-{'dl' if delivery == 'Download' else 'iv'}"
    manifest = model_manifest(name, uri, mlflow.tracking_uri, image={"override": runtime_image})
    manifest["spec"]["model"]["delivery"] = delivery
    if delivery == "ImageVolume":
        manifest["spec"]["image"]["registry"] = MODEL_REGISTRY
    notes: list[str] = []
    runs: list[dict[str, Any]] = []
    print(f"[{name}] {model} via {delivery}", flush=True)
    cluster.apply(manifest, namespace)
    if delivery == "Download":
        cold_pod, cold = measure(cluster, name, namespace, set(), operator)
    else:
        # The first pod follows the publish Job; the model image may be on the node already (an earlier run
        # published the same digest), so it is neither cold nor warm. Scale to 0, drop the image, scale to 1.
        first, _ = wait_new_ready_pod(cluster, name, namespace, set(), operator)
        obj = cluster.get("phi3", name, namespace)
        delivery_status = obj["status"].get("delivery", {})
        notes.append(f"{name}: status.delivery {json.dumps(delivery_status)}; publish Jobs "
                     f"{json.dumps(publish_job_s(cluster, namespace))}")
        image = delivery_status["image"]
        set_replicas(cluster, name, namespace, 0)
        wait_no_pods(cluster, name, namespace)
        removed = remove_node_image(cluster, image)
        left = [n for n, _ in node_images(cluster) if n == image]
        assert not left, f"{image} still on the node after ctr images rm"
        repository = image.split("/", 1)[1].split("@")[0]
        pulls_before = blob_pulls(cluster, repository)
        set_replicas(cluster, name, namespace, 1)
        cold_pod, cold = measure(cluster, name, namespace, {first["metadata"]["name"]}, operator)
        pulls = blob_pulls(cluster, repository) - pulls_before
        cold["image"] = image
        cold["image_records_removed"] = removed
        cold["registry_blob_pulls"] = pulls
        cold["delivery_size_bytes"] = delivery_status.get("sizeBytes")
        if pulls < 1:
            notes.append(f"{name}: the cold pod pulled no blob from the registry (registry log): not truly cold")
    runs.append({"model": model, "model_bytes": model_bytes, "delivery": delivery, "start": "cold", **cold})

    delete_pod(cluster, cold_pod)
    exclude = {cold_pod["metadata"]["name"]}
    if delivery == "ImageVolume":
        repository = cold["image"].split("/", 1)[1].split("@")[0]
        pulls_before = blob_pulls(cluster, repository)
    _, warm = measure(cluster, name, namespace, exclude, operator)
    if delivery == "ImageVolume":
        warm["registry_blob_pulls"] = blob_pulls(cluster, repository) - pulls_before
    runs.append({"model": model, "model_bytes": model_bytes, "delivery": delivery, "start": "warm", **warm})

    for run in runs[-2:]:
        phases = run["phases"]
        if delivery == "Download" and "fetched" in phases and "scheduled" in phases:
            span = phases["fetched"] - phases["scheduled"]
            run["fetch_MBps"] = round(model_bytes / MB / span, 1) if span > 0 else None
            run["fetch_MBps_basis"] = "model_bytes / (fetched - scheduled), whole-second timestamps"
        elif run["start"] == "cold" and "runtime_started" in phases and "scheduled" in phases:
            span = phases["runtime_started"] - phases["scheduled"]
            size = run.get("delivery_size_bytes") or model_bytes
            run["pull_MBps"] = round(size / MB / span, 1) if span > 0 else None
            run["pull_MBps_basis"] = ("status.delivery.sizeBytes / (runtime_started - scheduled), whole-second "
                                      "timestamps; includes creating the runtime container")
        print(f"  {run['start']}: {json.dumps(phases)}", flush=True)

    cluster.kubectl("delete", "phi3", name, "-n", namespace, "--wait=true", timeout=180)
    wait_no_pods(cluster, name, namespace)
    return runs, notes


def ratio(runs: list[dict[str, Any]], delivery: str, start: str, phase: str) -> float | None:
    def value(model: str) -> float | None:
        run = next((r for r in runs if r["model"] == model and r["delivery"] == delivery and r["start"] == start),
                   None)
        return run["phases"].get(phase) if run else None

    mini, tiny = value("phi3_mini_shaped"), value("tiny")
    return round(mini / tiny, 2) if mini is not None and tiny else None


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    started = datetime.now(timezone.utc)
    scratch = Path(tempfile.mkdtemp(prefix="realnode-bench-", dir=CACHE_ROOT.parent))
    notes = [
        "The machine has 2 cores shared with other work (other engineers' tests and benches ran on the same "
        "cluster): every timing is noisy; one run per cell.",
        "API timestamps (scheduled, fetched, runtime_started, ready) are whole seconds; the startup probe asks "
        "/v2/health/ready every second (and the kubelet probes readiness as soon as startup succeeds), so `ready` "
        "lags the model's readiness by about a second.",
        "loaded_model: the kubelet's (sub-second) timestamp on the runtime's MLServer 'Loaded model' log line, "
        "seconds from pod creation; null where the line was not found.",
        "first_token_after_ready_seen: from when this script saw the pod Ready (polling every 0.5 s) to the first "
        "streamed token through the Service's ClusterIP (openai SDK, stream=True, retried while the endpoint "
        "is not routed yet); first_token_from_creation: the same moment from pod creation.",
        "The runtime image (mlserver-cpu) was already on the node in every case: cold means the model is not.",
    ]
    try:
        # First: the loopback measurement serves on the bridge address, which exists while the node runs.
        if localcluster("status", check=False).returncode != 0:
            localcluster("up")
        disk, probe = disk_write_mbps(scratch)
        try:
            loopback = loopback_http_mbps(probe)
        finally:
            probe.unlink(missing_ok=True)
        print(f"limits: disk write {disk:.0f} MB/s, loopback HTTP {loopback:.0f} MB/s", flush=True)

        cluster = Cluster(kubeconfig=Path(localcluster("kubeconfig").stdout.strip().splitlines()[-1]))
        node = cluster.get("node", NODE_NAME)
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
        install_crd(cluster)
        runtime_image = build_images("mlserver-cpu")["mlserver-cpu"]
        runtime_on_node = any(n == runtime_image for n, _ in node_images(cluster))
        if not runtime_on_node:
            notes[-1] = "The runtime image was not on the node before the first pod: the first cold start pulled it."

        models = {"tiny": build_tiny_model(CACHE_ROOT / cache_key(build_tiny_model.__defaults__[0] or _tiny_spec())),
                  "phi3_mini_shaped": build_tiny_model(CACHE_ROOT / cache_key(PHI3_MINI_SHAPED), PHI3_MINI_SHAPED)}
        namespace = cluster.create_namespace("phi3-bench")
        operator = OperatorProcess(
            cluster=cluster,
            args=("--namespace", namespace, "--metrics-address", f"127.0.0.1:{free_port()}"),
            log_path=scratch / "operator.log",
            extra_env={**operator_env(resync_s=3.0, refresh_s=3.0), "PHI3_OPERATOR_CONFIG": str(OPERATOR_CONFIG)},
        )
        runs: list[dict[str, Any]] = []
        try:
            operator.start()
            with MlflowServer(scratch / "mlflow", host=BRIDGE_ADDRESS) as mlflow:
                for model, tiny in models.items():
                    uri = package("onnx", tiny.onnx_dir, name=f"bench-{model.replace('_', '-')}",
                                  tracking_uri=mlflow.tracking_uri, alias="champion")
                    size = tree_bytes(tiny.onnx_dir)
                    for delivery in ("Download", "ImageVolume"):
                        case_runs, case_notes = run_case(cluster, operator, namespace, runtime_image, mlflow, model,
                                                         uri, size, delivery)
                        runs += case_runs
                        notes += case_notes
        except BaseException:
            print(diagnose(cluster, namespace, operator), file=sys.stderr)
            raise
        finally:
            operator.stop()
            cluster.delete_namespace(namespace)

        missing = [r for r in runs if r["phases"].get("loaded_model") is None]
        if missing:
            notes.append(f"{len(missing)} of {len(runs)} pods logged no 'Loaded model' line: loaded_model unavailable "
                         "there.")
        result = {
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "date": started.isoformat(timespec="seconds"), "node": NODE_NAME,
                        "runtime_image": runtime_image},
            "limits": {"disk_write_MBps": round(disk, 1), "loopback_http_MBps": round(loopback, 1),
                       "disk_basis": f"dd 1 GiB, bs=4M, conv=fdatasync into {CACHE_ROOT.parent}",
                       "loopback_basis": f"1 GiB from python -m http.server on {BRIDGE_ADDRESS}, urllib on the host"},
            "runs": runs,
            "ratios": {
                "imagevolume_warm_ready_mini_over_tiny": ratio(runs, "ImageVolume", "warm", "ready"),
                "imagevolume_warm_ready_target": 1.5,
                "download_warm_ready_mini_over_tiny": ratio(runs, "Download", "warm", "ready"),
                "imagevolume_cold_ready_mini_over_tiny": ratio(runs, "ImageVolume", "cold", "ready"),
                "download_cold_ready_mini_over_tiny": ratio(runs, "Download", "cold", "ready"),
                "imagevolume_warm_loaded_model_mini_over_tiny": ratio(runs, "ImageVolume", "warm", "loaded_model"),
                "download_warm_loaded_model_mini_over_tiny": ratio(runs, "Download", "warm", "loaded_model"),
            },
            "notes": notes,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["ratios"], indent=2))
        print(f"wrote {RESULTS}")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _tiny_spec() -> Any:
    from tests.support.tiny_model import TinyModelSpec

    return TinyModelSpec()


if __name__ == "__main__":
    sys.exit(main())
