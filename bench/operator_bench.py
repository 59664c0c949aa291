"""Operator benchmarks on the local control plane (DESIGN section 8). Writes bench/results/operator.json.

1. CR-to-applied latency (CR created -> Deployment and Service applied and status written), p50/p99,
   against `kubectl apply --server-side` of the same children on the same control plane, side by side.
2. Time to reconcile N CRs (default 1,000) created at once.
3. Operator RSS at N CRs.
4. API writes by the operator during a no-op resync (from the API server's audit log).
5. The scale curve: a fresh operator process takes 100, then 1,000, then 3,000 models (added in steps);
   its CPU-seconds per model added and its RSS at each step show how cost grows with the model count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "operator"))

from tests.support.cluster import Cluster, localcluster  # noqa: E402
from tests.support.operator import OperatorProcess, install_crd, is_operator_agent, operator_env  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

from phi3_operator.builders import BuildContext, Owner, build_children  # noqa: E402
from phi3_operator.spec import parse_spec  # noqa: E402

RESULTS = REPO / "bench" / "results" / "operator.json"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def save_model(tmp: Path) -> str:
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return model_input

    path = tmp / "echo"
    if not (path / "MLmodel").exists():
        mlflow.pyfunc.save_model(path=str(path), python_model=Echo(), pip_requirements=["mlflow"])
    return path.as_uri()


def cr(name: str, uri: str) -> dict[str, Any]:
    return {
        "apiVersion": "phi3.ai/v1alpha1",
        "kind": "Phi3Model",
        "metadata": {"name": name},
        "spec": {"model": {"uri": uri}, "hardware": {"target": "cpu"}},
    }


def kubectl_baseline(cluster: Cluster, namespace: str, uri: str, samples: int) -> list[float]:
    """`kubectl apply --server-side` of exactly the children the operator builds, one CR's worth at a time."""
    timings = []
    for i in range(samples):
        ctx = BuildContext(
            owner=Owner(name=f"base-{i}", namespace=namespace, uid="00000000-0000-0000-0000-000000000000"),
            spec=parse_spec(cr(f"base-{i}", uri)["spec"]),
            image="ghcr.io/phi3-operator/mlserver-cpu:0.1.0",
            model_uri=uri,
            tracking_uri="http://mlflow.mlflow.svc:5000",
            onnx_variant="cpu-int4",
        )
        children = build_children(ctx)
        for child in children:
            child["metadata"].pop("ownerReferences")  # no owner object exists for the baseline
        payload = json.dumps({"apiVersion": "v1", "kind": "List", "items": children})
        started = time.perf_counter()
        cluster.kubectl("apply", "--server-side", "--field-manager=bench", "-f", "-", stdin=payload)
        timings.append(time.perf_counter() - started)
    return timings


def reconciled(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    return status.get("observedGeneration") == obj["metadata"]["generation"] and "endpoint" in status


def operator_latency(cluster: Cluster, namespace: str, uri: str, samples: int) -> list[float]:
    from kubernetes import client, config, watch

    config.load_kube_config(config_file=str(cluster.kubeconfig))
    custom = client.CustomObjectsApi()
    apps = client.AppsV1Api()
    core = client.CoreV1Api()
    timings = []
    for i in range(samples):
        name = f"lat-{i}"
        started = time.perf_counter()
        custom.create_namespaced_custom_object("phi3.ai", "v1alpha1", namespace, "phi3models", cr(name, uri))
        stream = watch.Watch()
        for event in stream.stream(custom.list_namespaced_custom_object, "phi3.ai", "v1alpha1", namespace,
                                   "phi3models", field_selector=f"metadata.name={name}", timeout_seconds=60):
            if reconciled(event["object"]):
                stream.stop()
        elapsed = time.perf_counter() - started
        apps.read_namespaced_deployment(name, namespace)
        core.read_namespaced_service(name, namespace)
        timings.append(elapsed)
    return timings


def control_plane_processes(cluster: Cluster) -> dict[str, tuple[psutil.Process, float]]:
    """The local cluster's processes with their CPU seconds so far, to see where a scale run spends."""
    state = str(cluster.kubeconfig.parent)
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and any(state in arg for arg in cmdline):
            found[Path(cmdline[0]).name] = (proc, sum(proc.cpu_times()[:2]))
    return found


def wait_for_reconciled(cluster: Cluster, namespace: str, count: int, deadline_s: float) -> None:
    """One watch stream counts models whose status is written: polling 1,000 objects would load the API."""
    from kubernetes import client, config, watch

    config.load_kube_config(config_file=str(cluster.kubeconfig))
    custom = client.CustomObjectsApi()
    done: set[str] = set()
    deadline = time.monotonic() + deadline_s
    while len(done) < count and time.monotonic() < deadline:
        listing = custom.list_namespaced_custom_object("phi3.ai", "v1alpha1", namespace, "phi3models")
        done.update(o["metadata"]["name"] for o in listing["items"] if reconciled(o))
        stream = watch.Watch()
        for event in stream.stream(custom.list_namespaced_custom_object, "phi3.ai", "v1alpha1", namespace,
                                   "phi3models", resource_version=listing["metadata"]["resourceVersion"],
                                   timeout_seconds=max(1, int(deadline - time.monotonic()))):
            if reconciled(event["object"]):
                done.add(event["object"]["metadata"]["name"])
                if len(done) >= count:
                    stream.stop()
    if len(done) < count:
        raise TimeoutError(f"only {len(done)}/{count} models reconciled within {deadline_s:.0f}s")


def audit_writes(audit_log: Path, since: int, namespaces: Sequence[str]) -> int:
    """Writes by the operator in `namespaces` after line `since` of the audit log."""
    count = 0
    with open(audit_log) as log:
        for number, line in enumerate(log):
            if number >= since:
                entry = json.loads(line)
                in_bench = (entry.get("objectRef") or {}).get("namespace") in namespaces
                count += in_bench and is_operator_agent(entry.get("userAgent", ""))
    return count


def writes_by_writer(audit_log: Path, since: int) -> dict[str, int]:
    """Writes after line `since`, counted by user agent (program name only), verb and resource."""
    counts: dict[str, int] = {}
    with open(audit_log) as log:
        for number, line in enumerate(log):
            if number < since:
                continue
            entry = json.loads(line)
            ref = entry.get("objectRef") or {}
            resource = ref.get("resource", "?") + ("/" + ref["subresource"] if ref.get("subresource") else "")
            agent = entry.get("userAgent", "?").split("/")[0]
            key = f"{agent} {entry.get('verb')} {resource}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def line_count(path: Path) -> int:
    with open(path) as handle:
        return sum(1 for _ in handle)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--crs", type=int, default=1000)
    parser.add_argument("--resync", type=float, default=30.0)
    parser.add_argument("--curve", default="100,1000,3000",
                        help="model counts for the scale curve, comma-separated; empty: skip it")
    args = parser.parse_args()

    started_cluster = localcluster("status", check=False).returncode != 0
    if started_cluster:
        localcluster("up")
    cluster = Cluster(kubeconfig=Path(localcluster("kubeconfig").stdout.strip()))
    install_crd(cluster)
    work = Path("/tmp/phi3-bench")
    work.mkdir(exist_ok=True)
    uri = save_model(work)
    audit_log = cluster.kubeconfig.parent / "audit.log"
    namespaces = [cluster.create_namespace(p) for p in ("bench-baseline", "bench-latency", "bench-scale")]
    # Only the bench's namespaces: models an earlier run left terminating must not be reconciled and counted.
    operator = OperatorProcess(cluster, work / "operator.log", operator_env(resync_s=args.resync, refresh_s=60),
                               args=tuple(arg for namespace in namespaces for arg in ("--namespace", namespace)))
    machine = {"cpus": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30)}
    result: dict[str, Any] = {"machine": machine}
    try:
        baseline = kubectl_baseline(cluster, namespaces[0], uri, args.samples)
        operator.start()
        wait_until(lambda: "Initial authentication has finished" in operator.log(), timeout=60,
                   message="operator start")
        latency = operator_latency(cluster, namespaces[1], uri, args.samples)
        result["latency"] = {
            "samples": args.samples,
            "operator_p50_s": round(statistics.median(latency), 4),
            "operator_p99_s": round(percentile(latency, 0.99), 4),
            "kubectl_apply_server_side_p50_s": round(statistics.median(baseline), 4),
            "kubectl_apply_server_side_p99_s": round(percentile(baseline, 0.99), 4),
            "p50_ratio_operator_over_kubectl": round(statistics.median(latency) / statistics.median(baseline), 2),
            "target_p50_ratio_max": 3.0,
        }
        print(json.dumps(result["latency"], indent=2), flush=True)

        process = psutil.Process(operator.process.pid if operator.process else 0)
        cpu_before = sum(process.cpu_times()[:2])
        components = control_plane_processes(cluster)
        scale_ns = namespaces[2]
        manifests = [cr(f"scale-{i:04d}", uri) for i in range(args.crs)]
        scale_mark = line_count(audit_log)
        started = time.perf_counter()
        for chunk in range(0, len(manifests), 250):
            items = manifests[chunk : chunk + 250]
            cluster.kubectl("create", "-n", scale_ns, "-f", "-", timeout=600,
                            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

        wait_for_reconciled(cluster, scale_ns, args.crs, deadline_s=900)
        scale_s = time.perf_counter() - started
        cpu_by_component = {name: round(sum(p.cpu_times()[:2]) - cpu0, 1) for name, (p, cpu0) in components.items()}
        rss_mb = process.memory_info().rss / 2**20
        result["scale"] = {"crs": args.crs, "reconcile_all_s": round(scale_s, 1), "target_s": 60,
                           "operator_cpu_s": round(sum(process.cpu_times()[:2]) - cpu_before, 1),
                           "control_plane_cpu_s": cpu_by_component,
                           "operator_rss_mb": round(rss_mb, 1), "target_rss_mb": 150,
                           "writes_by_writer": writes_by_writer(audit_log, scale_mark)}
        print(json.dumps(result["scale"], indent=2), flush=True)

        # Let rollouts settle, then watch two full resync intervals for writes.
        def settled() -> bool:
            mark = line_count(audit_log)
            return audit_writes(audit_log, mark, namespaces) == 0 and _sleep_then_quiet(
                audit_log, mark, args.resync / 3, namespaces)

        wait_until(settled, timeout=600, interval=0.1, message="operator writes to settle")
        mark = line_count(audit_log)
        resyncs_before = operator.log().count(" models in ")
        time.sleep(2 * args.resync + 2)
        passes = operator.log().count(" models in ") - resyncs_before
        result["noop_resync"] = {
            "resync_interval_s": args.resync,
            "resync_passes_observed": passes,
            "models": args.crs + args.samples,
            "operator_writes": audit_writes(audit_log, mark, namespaces),
            "target_writes": 0,
        }
        result["scale"]["operator_rss_mb_after_resync"] = round(process.memory_info().rss / 2**20, 1)
        print(json.dumps(result["noop_resync"], indent=2), flush=True)
        if args.curve:
            operator.stop()
            cluster.delete_namespace(scale_ns)
            steps = [int(step) for step in args.curve.split(",")]
            result["scale_curve"] = scale_curve(cluster, uri, work, steps, args.resync)
            print(json.dumps(result["scale_curve"], indent=2), flush=True)
    finally:
        operator.stop()
        for namespace in namespaces:
            cluster.delete_namespace(namespace)
        if started_cluster:
            localcluster("down")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


def scale_curve(cluster: Cluster, uri: str, work: Path, steps: list[int], resync_s: float) -> dict[str, Any]:
    """One fresh operator, models added in steps; per step: CPU-seconds per model added, RSS at the total."""
    namespace = cluster.create_namespace("bench-curve")
    # It watches its own namespace only: the models of the earlier phases are still being deleted.
    operator = OperatorProcess(cluster, work / "operator-curve.log", operator_env(resync_s=resync_s, refresh_s=60),
                               args=("--namespace", namespace))
    operator.start()
    points: list[dict[str, Any]] = []
    try:
        wait_until(lambda: "Initial authentication has finished" in operator.log(), timeout=60,
                   message="operator start")
        process = psutil.Process(operator.process.pid if operator.process else 0)
        created = 0
        for total in steps:
            cpu_before = sum(process.cpu_times()[:2])
            started = time.perf_counter()
            manifests = [cr(f"curve-{i:05d}", uri) for i in range(created, total)]
            for chunk in range(0, len(manifests), 250):
                cluster.kubectl("create", "-n", namespace, "-f", "-", timeout=600, stdin=json.dumps(
                    {"apiVersion": "v1", "kind": "List", "items": manifests[chunk : chunk + 250]}))
            wait_for_reconciled(cluster, namespace, total, deadline_s=1800)
            cpu_s = sum(process.cpu_times()[:2]) - cpu_before
            points.append({"models": total, "added": total - created,
                           "reconcile_added_s": round(time.perf_counter() - started, 1),
                           "operator_cpu_s_added": round(cpu_s, 1),
                           "operator_cpu_ms_per_model": round(1000 * cpu_s / (total - created), 1),
                           "operator_rss_mb": round(process.memory_info().rss / 2**20, 1)})
            print(json.dumps(points[-1]), flush=True)
            created = total
    finally:
        operator.stop()
        cluster.delete_namespace(namespace)
    first, last = points[0], points[-1]
    # Linear or better: the last step's cost per model is no higher than the first's (with a noise margin),
    # and RSS per model above the first point's baseline does not grow from step to step.
    rss_per_model = [round((b["operator_rss_mb"] - a["operator_rss_mb"]) / (b["models"] - a["models"]) * 1000, 1)
                     for a, b in itertools.pairwise(points)]
    return {"points": points,
            "rss_kb_per_model_between_steps": rss_per_model,
            "cpu_per_model_last_over_first": round(last["operator_cpu_ms_per_model"]
                                                   / max(first["operator_cpu_ms_per_model"], 0.1), 2),
            "target": "CPU per model and RSS per model must not grow with the model count (at most linear)"}


def _sleep_then_quiet(audit_log: Path, mark: int, seconds: float, namespaces: Sequence[str]) -> bool:
    time.sleep(seconds)
    return audit_writes(audit_log, mark, namespaces) == 0


if __name__ == "__main__":
    sys.exit(main())
