"""`make demo`: the whole product on the embedded local cluster, step by step.

Starts the local control plane and a local MLflow server, builds the tiny Phi-3 model, packages it
into MLflow with the alias `champion`, runs the operator, applies examples/phi3-cpu.yaml, serves a
chat request through the runtime command the Deployment runs, then moves the alias and shows the
rollout. `--down` stops everything the demo started.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.cluster import Cluster, localcluster  # noqa: E402
from tests.support.mlflow_server import free_port  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

STATE = Path(os.environ.get("PHI3_DEMO_DIR", Path.home() / ".cache" / "phi3-operator" / "demo"))
MLFLOW_PORT = int(os.environ.get("PHI3_DEMO_MLFLOW_PORT", "5055"))
TRACKING_URI = f"http://127.0.0.1:{MLFLOW_PORT}"
NAMESPACE = "phi3-demo"
MODEL = "phi3-mini"
BIN = Path(sys.executable).parent
STEP_NUMBERS = itertools.count(1)


def step(text: str) -> None:
    print(f"\n==> [{next(STEP_NUMBERS)}] {text}", flush=True)


def info(text: str) -> None:
    print(f"    {text}", flush=True)


def run(*cmd: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, text=True, capture_output=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"demo: {' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def start_daemon(name: str, cmd: list[str], env: dict[str, str]) -> None:
    """A background process that outlives the demo (until `make demo-down`), with a pid file."""
    pid_file = STATE / f"{name}.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 0)
            info(f"{name} already runs (pid {pid_file.read_text().strip()})")
            return
        except (OSError, ValueError):
            pass
    with open(STATE / f"{name}.log", "ab") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(process.pid))
    info(f"{name} started (pid {process.pid}, log {STATE / (name + '.log')})")


def stop_daemon(name: str) -> None:
    pid_file = STATE / f"{name}.pid"
    if not pid_file.exists():
        return
    try:
        pid = int(pid_file.read_text())
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
    pid_file.unlink(missing_ok=True)
    print(f"stopped {name}")


def mlflow_healthy() -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{TRACKING_URI}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def package(onnx_dir: Path) -> str:
    out = run(str(BIN / "phi3-operator"), "package", "onnx", str(onnx_dir), "--name", MODEL,
              "--alias", "champion", "--tracking-uri", TRACKING_URI)
    return out.strip().splitlines()[-1]


def phi3(cluster: Cluster) -> dict[str, Any]:
    result: dict[str, Any] = cluster.get("phi3", MODEL, NAMESPACE)
    return result


def ready(cluster: Cluster) -> dict[str, Any] | None:
    obj = phi3(cluster)
    status = obj.get("status", {})
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    fresh = status.get("observedGeneration") == obj["metadata"]["generation"]
    return obj if fresh and conditions.get("Ready", {}).get("status") == "True" else None


def serve_locally(cluster: Cluster) -> None:
    """Run the Deployment's own init and runtime commands on 127.0.0.1 and ask for a chat completion."""
    deployment = cluster.get("deployment", MODEL, NAMESPACE)
    pod = deployment["spec"]["template"]["spec"]
    fetch_cmd = list(pod["initContainers"][0]["command"])
    serve_cmd = list(pod["containers"][0]["command"])
    env_list = pod["containers"][0]["env"]
    model_dir = STATE / "served-model"
    shutil.rmtree(model_dir, ignore_errors=True)
    # The pod writes to /models/model; locally the same command writes under the demo's state dir.
    fetch_cmd[fetch_cmd.index("--dest") + 1] = str(model_dir)
    serve_cmd[serve_cmd.index("--model-uri") + 1] = str(model_dir)
    ports = {flag: str(free_port()) for flag in ("--http-port", "--grpc-port", "--metrics-port")}
    for flag, port in ports.items():
        serve_cmd[serve_cmd.index(flag) + 1] = port
    env = {**os.environ, "MLFLOW_TRACKING_URI": TRACKING_URI, "HF_HUB_OFFLINE": "1",
           **{e["name"]: e["value"] for e in env_list if e["name"] not in ("HOME", "MLFLOW_TRACKING_URI")}}
    info("init container command: " + " ".join(fetch_cmd))
    run(str(BIN / fetch_cmd[0]), *fetch_cmd[1:], env=env)
    info("runtime command:        " + " ".join(serve_cmd))
    log_path = STATE / "local-runtime.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(BIN / serve_cmd[0]), *serve_cmd[1:]], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{ports['--http-port']}"
    try:
        import urllib.request

        def up() -> bool:
            if server.poll() is not None:
                raise SystemExit(f"demo: the runtime exited; see {log_path}")
            with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as response:
                return bool(response.status == 200)

        wait_until(up, timeout=180, interval=0.5, message="the local runtime to be ready")
        from openai import OpenAI

        client = OpenAI(base_url=f"{base}/v1", api_key="not-needed")
        question = "Hello! Who are you?"
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=24
        )
        info(f"user:      {question}")
        info(f"assistant: {answer.choices[0].message.content!r}")
        info(f"usage:     {answer.usage.model_dump() if answer.usage else {}}")
        info("The tiny model has random weights, so the words are noise; the path is real.")
        info(f"Where this answer came from: a real MLServer process on {base}, started with the")
        info("Deployment's own runtime command. The pods in the local cluster are simulated by kwok")
        info("and serve nothing: their Running/Ready state is kwok's.")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def up() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    step("Starting the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)")
    out = localcluster("up").stdout.strip().splitlines()[-1]
    cluster = Cluster(kubeconfig=Path(localcluster("kubeconfig").stdout.strip()))
    info(out)
    info(cluster.kubectl("get", "nodes").stdout.strip().replace("\n", "\n    "))

    step(f"Starting a local MLflow server on {TRACKING_URI} (sqlite, local artifacts)")
    (STATE / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    if not mlflow_healthy():
        stop_daemon("mlflow")
        start_daemon("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                                f"sqlite:///{STATE / 'mlflow' / 'mlflow.db'}", "--artifacts-destination",
                                str(STATE / "mlflow" / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
                                "--port", str(MLFLOW_PORT), "--workers", "1"], dict(os.environ))
    wait_until(mlflow_healthy, timeout=120, message="the MLflow server")
    info("MLflow is healthy")

    step("Building the tiny Phi-3 model (random weights, local tokenizer) and its ONNX variants")
    from tests.support.tiny_model import build_tiny_model

    tiny = build_tiny_model(STATE / "tiny-model")
    info(f"ONNX GenAI variants: {sorted(p.name for p in tiny.onnx_dir.iterdir() if p.is_dir())}")

    step(f"Packaging it into MLflow: phi3-operator package onnx ... --name {MODEL} --alias champion")
    first_uri = package(tiny.onnx_dir)
    info(f"registered {first_uri} with alias champion")

    step("Installing the CRD and starting the operator")
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/phi3models.phi3.ai", "--timeout=60s")
    operator_env = {**cluster.env, "PHI3_DEFAULT_TRACKING_URI": TRACKING_URI, "PHI3_RESYNC_INTERVAL": "10",
                    "PHI3_MODEL_REFRESH_INTERVAL": "5", "MALLOC_ARENA_MAX": "2"}
    start_daemon("operator", [str(BIN / "phi3-operator"), "run", "--namespace", NAMESPACE], operator_env)

    step(f"kubectl apply -f examples/phi3-cpu.yaml -n {NAMESPACE}")
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    info(cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(REPO / "examples" / "phi3-cpu.yaml")).stdout.strip())
    obj = wait_until(lambda: ready(cluster), timeout=180, message="Ready=True")
    info(cluster.kubectl("get", "phi3", "-n", NAMESPACE).stdout.strip().replace("\n", "\n    "))
    model = obj["status"]["model"]
    info(f"models:/{MODEL}@champion resolved to {model['resolvedUri']} (run {model.get('runId', '')})")
    info(f"endpoint: {obj['status']['endpoint']['chatCompletions']}")

    step("Serving a chat request through the runtime command the Deployment runs")
    serve_locally(cluster)

    step("Packaging a new version and moving the alias champion to it")
    second_uri = package(tiny.onnx_dir)
    info(f"registered {second_uri}; champion now points at it")

    def rolled() -> dict[str, Any] | None:
        current = ready(cluster)
        return current if current and current["status"]["model"]["resolvedUri"] == second_uri else None

    obj = wait_until(rolled, timeout=120, message=f"the rollout to {second_uri}")
    deployment = cluster.get("deployment", MODEL, NAMESPACE)
    fetch = deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]
    info(f"Deployment now fetches {fetch[fetch.index('--model-uri') + 1]}")
    info(cluster.kubectl("get", "phi3", "-n", NAMESPACE).stdout.strip().replace("\n", "\n    "))
    events = cluster.kubectl("get", "events", "-n", NAMESPACE, "--field-selector",
                             "reason=ModelVersionChanged", "-o", "json").stdout
    for event in json.loads(events)["items"][-1:]:
        info(f"event ModelVersionChanged: {event['message']}")

    print(f"\nDemo finished in {time.monotonic() - started:.0f}s. Everything is still running, so you can look:")
    print(f"  eval \"$({REPO / 'hack' / 'localcluster'} env)\"   # PATH with the cached kubectl and helm, KUBECONFIG")
    print(f"  kubectl get phi3,deploy,svc,pods -n {NAMESPACE}")
    print(f"  MLflow UI: {TRACKING_URI}   operator log: {STATE / 'operator.log'}")
    print("Clean up with: make demo-down")


def down() -> None:
    stop_daemon("operator")
    stop_daemon("mlflow")
    localcluster("down")
    print("local control plane stopped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--down", action="store_true", help="stop what the demo started")
    args = parser.parse_args()
    down() if args.down else up()
    return 0


if __name__ == "__main__":
    sys.exit(main())
