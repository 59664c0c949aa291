"""A user's chat pyfunc under 8 concurrent clients: our runtime against `mlflow models serve`.

    .venv/bin/python bench/pyfunc_serving.py [--requests 40] [--clients 8]

The model is the `ChatModel` the serving tests log with MLflow's own API (models-from-code; it
answers word by word), saved once and served from the same folder by both servers:
- ours: `phi3-operator serve` (MLServer, the pyfunc in a bounded pool), over `/invocations` and over
  `/v1/chat/completions`;
- MLflow's: `mlflow models serve --env-manager local` (its FastAPI scoring server), over `/invocations`.

Two variants of the model: `echo` (no work: the servers' own cost) and `io` (each predict waits
`--io-ms`, as a model that calls out to an engine or an API does: how concurrency is handled).
Contenders alternate round by round so machine noise hits them alike. Writes
bench/results/pyfunc_serving.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "operator"))

from tests.support.serving import MlflowModelsServe, ServedProcess  # noqa: E402
from tests.support.user_models import CHAT_MODEL_CODE  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "pyfunc_serving.json"
MESSAGES = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]


def save_chat_model(dest: Path, io_ms: int) -> None:
    import mlflow.pyfunc

    code = CHAT_MODEL_CODE
    if io_ms:
        header = "def words(messages, params):"
        code = code.replace(header, f"{header}\n    time.sleep({io_ms / 1000})")
        code = code.replace("import uuid", "import time\nimport uuid")
    source = dest.parent / f"{dest.name}.py"
    source.write_text(code)
    mlflow.pyfunc.save_model(str(dest), python_model=str(source), input_example={"messages": MESSAGES})


def post(port: int, path: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path} answered {response.status}: {payload[:200]!r}")
    finally:
        connection.close()
    return time.perf_counter() - started


def load(port: int, path: str, body: dict[str, Any], clients: int, requests: int) -> dict[str, float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda _: post(port, path, body), range(requests)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests_per_s": requests / elapsed,
        "latency_p50_ms": statistics.median(ordered) * 1000,
        "latency_p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
    }


def compare(model_dir: Path, workdir: Path, clients: int, requests: int, rounds: int) -> dict[str, Any]:
    chat_body = {"model": "bench-chat", "messages": MESSAGES}
    invocations_body = {"messages": MESSAGES}
    ours = ServedProcess(str(model_dir), "bench-chat", workdir / "serve.log",
                         env={"PHI3_MAX_CONCURRENCY": str(clients), "HOME": str(workdir)})
    with ours:
        reference = MlflowModelsServe(model_dir, workdir / "mlflow-serve.log")
        try:
            contenders = {
                "ours_invocations": (ours.http_port, "/invocations", invocations_body),
                "ours_chat_completions": (ours.http_port, "/v1/chat/completions", chat_body),
                "mlflow_models_serve_invocations": (reference.port, "/invocations", invocations_body),
            }
            for port, path, body in contenders.values():  # warm-up
                load(port, path, body, clients, clients)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
            for _ in range(rounds):
                for name, (port, path, body) in contenders.items():
                    runs[name].append(load(port, path, body, clients, requests))
        finally:
            reference.stop()
    summary = {
        name: {key: statistics.median(run[key] for run in results) for key in results[0]}
        for name, results in runs.items()
    }
    reference_rate = summary["mlflow_models_serve_invocations"]["requests_per_s"]
    summary["ratios_vs_mlflow_models_serve"] = {
        "ours_invocations": summary["ours_invocations"]["requests_per_s"] / reference_rate,
        "ours_chat_completions": summary["ours_chat_completions"]["requests_per_s"] / reference_rate,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=80, help="requests per round and contender")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--io-ms", type=int, default=50)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "clients": args.clients,
        "requests_per_round": args.requests,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory(prefix="phi3-bench-pyfunc-") as tmp:
        for variant, io_ms in (("echo", 0), ("io", args.io_ms)):
            workdir = Path(tmp) / variant
            workdir.mkdir()
            model_dir = workdir / "model"
            save_chat_model(model_dir, io_ms)
            result[variant] = {"io_ms": io_ms, **compare(model_dir, workdir, args.clients, args.requests, args.rounds)}
            print(variant, json.dumps(result[variant]["ratios_vs_mlflow_models_serve"]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
