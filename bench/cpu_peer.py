"""CPU serving speed against llama.cpp's server, side by side in one run, on the Phi-3-mini-shaped model.

    .venv/bin/python bench/cpu_peer.py [--quick]

Both engines get the same weights and the same SentencePiece tokenizer: the bench model's Hugging Face
folder goes to onnxruntime-genai int4 (the model builder) and to GGUF Q4_0 (llama.cpp's converter and
quantizer, bench/llama_cpp.py). Measured, contenders alternating level by level so machine noise hits
them alike:

- over HTTP with the openai SDK streaming, the same prompt and `max_tokens` with `ignore_eos`, at 1, 2,
  4, 8 and 16 clients: our runtime (`phi3-operator serve`, og.Engine) and `llama-server -np 8 -t 2`:
  aggregate tokens/s, TTFT p50/p99, ITL p50;
- the bare engines: an og.Engine loop, `llama-bench -t 2` and `llama-batched-bench -t 2`;
- tuning, each variant of our runtime served alone, in rotating rounds, against the runtime's default at
  1 and 8 clients: session options (`session.intra_op.allow_spinning`, `intra_op_num_threads`) and the
  int4 block size (128 against the builder's 32);
- a per-op profile of batched decode steps (ORT's `enable_profiling`).

Targets (ratios within one run): 1 client >= 0.9x llama-server; 8 clients >= 0.8x llama-server -np 8;
our HTTP >= 0.95x our bare engine at 1 client and >= 0.9x at 8. Writes bench/results/cpu_peer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "operator"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import llama_cpp  # noqa: E402
from tests.support.serving import ServedProcess  # noqa: E402
from tests.support.tiny_model import CACHE_ROOT, PHI3_MINI_SHAPED, TinyModelSpec, build_tiny_model, cache_key  # noqa: E402

from phi3_serving.cpus import SPINNING_KEYS  # noqa: E402
from serving import MESSAGES, bare_engine, sdk_streams, summarize  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "cpu_peer.json"
VARIANT = "cpu-int4"
CLIENT_LEVELS = (1, 2, 4, 8, 16)
MAX_BATCH = 16  # spec.serving.maxBatchSize for our runtime: room for every level
LLAMA_PARALLEL = 8
THREADS = 2


def model_folder(spec: TinyModelSpec) -> Path:
    """The cached model: hf/ and onnx/<variant>/ (built once, see tests/support/tiny_model.py)."""
    folder = CACHE_ROOT / cache_key(spec)
    build_tiny_model(folder, spec)
    return folder


def with_session_options(onnx_dir: Path, out_dir: Path, options: dict[str, Any]) -> Path:
    """A copy of the model folder whose decoder session options carry `options`."""
    variant = onnx_dir / VARIANT
    target = out_dir / VARIANT
    target.mkdir(parents=True)
    for item in variant.iterdir():
        if item.name != "genai_config.json":
            shutil.copy2(item, target / item.name)  # MLflow refuses links that leave the folder
    config = json.loads((variant / "genai_config.json").read_text())
    config["model"]["decoder"].setdefault("session_options", {}).update(options)
    (target / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def matmul_nbits_attributes(onnx_dir: Path) -> dict[str, Any]:
    """block_size and accuracy_level of the model's MatMulNBits nodes, as the builder wrote them."""
    import onnx

    graph = onnx.load(str(onnx_dir / VARIANT / "model.onnx"), load_external_data=False).graph
    seen: dict[str, set[int]] = defaultdict(set)
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name in ("block_size", "accuracy_level", "bits"):
                    seen[attribute.name].add(int(attribute.i))
    return {name: sorted(values) for name, values in seen.items()}


def run_levels(contenders: dict[str, Callable[[int, int], dict[str, Any]]], levels: tuple[int, ...],
               max_tokens: int, tokens_per_level: int, reps: int) -> dict[str, list[dict[str, Any]]]:
    """Every contender at every level, `reps` times, the order reversed on each repetition."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    order = list(contenders)
    for clients in levels:
        per_client = max(2, tokens_per_level // (clients * max_tokens))
        print(f"  {clients} clients x {per_client} requests x {max_tokens} tokens x {reps}", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
        for rep in range(reps):
            for name in order if rep % 2 == 0 else order[::-1]:
                runs[name].append(contenders[name](clients, per_client))
        for name in contenders:
            row = summarize(clients, runs[name])
            row["tokens_generated"] = [run.get("tokens") for run in runs[name]]
            rows[name].append(row)
    return rows


def ratio(rows: dict[str, list[dict[str, Any]]], numerator: str, denominator: str, clients: int) -> float:
    top = next(row for row in rows[numerator] if row["clients"] == clients)
    bottom = next(row for row in rows[denominator] if row["clients"] == clients)
    return float(statistics.median(
        a / b for a, b in zip(top["tokens_per_s_runs"], bottom["tokens_per_s_runs"], strict=True)
    ))


def tune_in_isolation(saved: dict[str, Path], env: dict[str, str], scratch: Path, max_tokens: int,
                      rounds: int) -> dict[str, Any]:
    """Each variant served alone (two of our servers side by side slow each other down far more than the
    variants differ), in rotating order, `rounds` times; a ratio is taken within a round, the median kept."""
    levels = {1: 8, 8: 2}  # clients: requests per client
    speeds: dict[str, dict[int, list[float]]] = {name: {c: [] for c in levels} for name in saved}
    names = list(saved)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            with ServedProcess(str(saved[name]), "bench", scratch / f"{name}.log", env=env) as server:
                sdk_streams(server.base_url, 2, 1, 4)
                time.sleep(3)  # the lone-request measurement runs while the server is idle: let it end
                for clients, requests in levels.items():
                    run = sdk_streams(server.base_url, clients, requests, max_tokens)
                    speeds[name][clients].append(run["tokens_per_s"])
            latest = {c: round(v[-1], 1) for c, v in speeds[name].items()}
            print(f"  round {round_index}: {name} {latest}", flush=True)
    baseline = "runtime_default"
    return {
        name: {
            "tokens_per_s": {str(c): values for c, values in by_clients.items()},
            "over_runtime_default": {
                str(c): statistics.median(v / b for v, b in zip(values, speeds[baseline][c], strict=True))
                for c, values in by_clients.items()
            },
        }
        for name, by_clients in speeds.items()
    }


def prompt_tokens(base_url: str) -> int:
    """How many tokens the server's chat template and tokenizer make of the bench prompt."""
    from openai import OpenAI

    answer = OpenAI(base_url=f"{base_url}/v1", api_key="-", max_retries=0).chat.completions.create(
        model="bench", messages=MESSAGES, max_tokens=1, temperature=0  # type: ignore[arg-type]
    )
    assert answer.usage is not None
    return int(answer.usage.prompt_tokens)


def llama_bench(gguf: Path, prompt: int, generated: int) -> dict[str, Any]:
    """`llama-bench -t 2`: prompt processing and single-stream generation of the bare llama.cpp engine."""
    output = subprocess.run(
        [str(llama_cpp.build() / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(THREADS), "-p", str(prompt),
         "-n", str(generated), "-r", "3", "-o", "json"], check=True, capture_output=True, text=True,
    ).stdout
    results = {}
    for test in json.loads(output):
        kind = "prompt" if test["n_gen"] == 0 else "generate"
        results[kind] = {"tokens": test["n_prompt"] or test["n_gen"], "tokens_per_s": test["avg_ts"],
                         "stddev": test["stddev_ts"]}
    return results


def llama_batched_bench(gguf: Path, prompt: int, generated: int) -> list[dict[str, Any]]:
    """`llama-batched-bench`: N sequences decoding together in the bare llama.cpp engine."""
    levels = ",".join(str(level) for level in CLIENT_LEVELS)
    output = subprocess.run(
        [str(llama_cpp.build() / "bin" / "llama-batched-bench"), "-m", str(gguf), "-t", str(THREADS),
         "-tb", str(THREADS), "-c", str(max(CLIENT_LEVELS) * (prompt + generated) + 64), "-npp", str(prompt),
         "-ntg", str(generated), "-npl", levels, "--output-format", "jsonl"],
        check=True, capture_output=True, text=True,
    ).stdout
    rows = []
    for line in output.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows.append({"clients": row["pl"], "generate_tokens_per_s": row["speed_tg"],
                         "prompt_tokens_per_s": row["speed_pp"], "total_tokens_per_s": row["speed"]})
    return rows


def profile_decode(onnx_dir: Path, scratch: Path, batch: int, steps: int) -> dict[str, Any]:
    """ORT's per-op profile of `batch` greedy turns decoding together on og.Engine, summed by op type."""
    import numpy as np
    import onnxruntime_genai as og
    from tests.support.og_engine import begin_greedy_turns

    scratch.mkdir(parents=True, exist_ok=True)
    prefix = scratch / "ort-profile"
    config = og.Config(str(onnx_dir / VARIANT))
    config.overlay(json.dumps({
        "engine": {"static_batching": {"max_batch_size": batch}},
        "model": {"decoder": {"session_options": {"enable_profiling": str(prefix)}}},
    }))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    engine = og.Engine(model)
    events = engine.create_event_buffer(256)
    prompt = np.asarray(
        tokenizer.encode(tokenizer.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True)),
        dtype=np.int32,
    )
    requests = begin_greedy_turns(engine, prompt, batch, steps)
    while engine.has_pending_requests():
        engine.run(events)
    for request in requests:
        request.close()
    del engine, model
    (trace,) = scratch.glob("ort-profile*.json")
    events = json.loads(trace.read_text())
    runs = [event for event in events if event.get("cat") == "Session" and event.get("name") == "model_run"]
    prefill = max(runs, key=lambda event: event["dur"])  # the prompt's run is the longest: leave it out
    decode_runs = [event for event in runs if event is not prefill]
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if prefill["ts"] <= event["ts"] <= prefill["ts"] + prefill["dur"]:
            continue
        by_op[event["args"].get("op_name", "?")] += event["dur"]
        by_node[event["name"].removesuffix("_kernel_time")] += event["dur"]
    total = sum(by_op.values())
    steps = len(decode_runs)
    return {
        "batch": batch,
        "decode_steps": steps,
        "decode_step_ms_median": statistics.median(event["dur"] for event in decode_runs) / 1e3,
        "prefill_ms": prefill["dur"] / 1e3,
        "share_by_op": {op: round(us / total, 4) for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "ms_per_step_by_op": {
            op: round(us / 1e3 / steps, 2) for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])
        },
        "ms_per_step_top_nodes": {
            node: round(us / 1e3 / steps, 2) for node, us in sorted(by_node.items(), key=lambda kv: -kv[1])[:8]
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens per level (a smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scale = 0.3 if args.quick else 1.0
    max_tokens = 32
    tokens_per_level = max(96, int(384 * scale))
    reps = 2

    from phi3_serving.packaging import save_onnx_model

    started = time.monotonic()
    llama_dir = llama_cpp.build()
    spec = PHI3_MINI_SHAPED
    folder = model_folder(spec)
    block_128 = model_folder(replace(spec, builder_options=("block_size=128",)))
    gguf = llama_cpp.to_gguf(folder / "hf", folder / f"gguf-llama-cpp-python-{llama_cpp.LLAMA_CPP_PYTHON_VERSION}")
    print(f"models ready in {time.monotonic() - started:.0f}s: {folder}, {gguf.name}", flush=True)

    result: dict[str, Any] = {
        "benchmark": "cpu_peer",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {
            "onnxruntime-genai": metadata.version("onnxruntime-genai"),
            "onnxruntime": metadata.version("onnxruntime"),
            "llama-cpp-python (llama.cpp source)": llama_cpp.LLAMA_CPP_PYTHON_VERSION,
        },
        "model": {"spec": spec.__dict__ | {"variants": list(spec.variants)}, "cache_key": cache_key(spec),
                  "onnx_matmul_nbits": matmul_nbits_attributes(folder / "onnx"),
                  "onnx_block_128_matmul_nbits": matmul_nbits_attributes(block_128 / "onnx"),
                  "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
                  "onnx_bytes": sum(p.stat().st_size for p in (folder / "onnx" / VARIANT).iterdir())},
        "max_tokens": max_tokens,
        "llama_server": {"parallel": LLAMA_PARALLEL, "threads": THREADS, "binary": str(llama_dir / "bin")},
    }
    def checkpoint() -> None:  # a phase's numbers survive a later phase's failure
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    serve_env = {"PHI3_ONNX_VARIANT": VARIANT, "PHI3_ONNX_ENGINE": "batch", "PHI3_MAX_BATCH_SIZE": str(MAX_BATCH),
                 "PHI3_MAX_TOKENS": str(max_tokens)}
    with tempfile.TemporaryDirectory(prefix="phi3-bench-cpu-peer-") as scratch_name:
        scratch = Path(scratch_name)
        # Every variant is made before anything is measured, so that a bad one fails in seconds. The
        # baseline is the runtime's own choice (phi3_serving.cpus: here 2 threads, onnxruntime's spinning);
        # the others state their session options in the model, which the runtime then keeps.
        no_spinning = dict.fromkeys(SPINNING_KEYS, "0")
        variants = {
            "runtime_default": folder / "onnx",
            "no_spinning": with_session_options(folder / "onnx", scratch / "no_spinning", no_spinning),
            "1_thread": with_session_options(folder / "onnx", scratch / "1_thread", {"intra_op_num_threads": 1}),
            "1_thread_no_spinning": with_session_options(
                folder / "onnx", scratch / "1_thread_no_spinning", {"intra_op_num_threads": 1, **no_spinning}),
            "block_size_128": block_128 / "onnx",
        }
        saved = {name: save_onnx_model(path, scratch / f"{name}-mlflow") for name, path in variants.items()}
        for name in variants:  # the copies' weights are in the saved models now
            shutil.rmtree(scratch / name, ignore_errors=True)
        ours_path = saved["runtime_default"]
        with (
            ServedProcess(str(ours_path), "bench", scratch / "ours.log", env=serve_env) as ours,
            llama_cpp.LlamaServer(gguf, scratch / "llama-server.log", parallel=LLAMA_PARALLEL,
                                  threads=THREADS) as llama,
        ):
            bare = bare_engine(folder / "onnx" / VARIANT, MAX_BATCH)
            for url in (ours.base_url, llama.base_url):  # first requests pay for lazy setup
                sdk_streams(url, 2, 1, 4)
            bare(2, 1, 4)
            result["prompt_tokens"] = {
                "ours": prompt_tokens(ours.base_url),
                "llama_server": prompt_tokens(llama.base_url),
            }
            print(f"side by side ({result['prompt_tokens']}) ...", flush=True)
            side = run_levels(
                {
                    "ours_http": lambda c, n: sdk_streams(ours.base_url, c, n, max_tokens),
                    "llama_server_http": lambda c, n: sdk_streams(llama.base_url, c, n, max_tokens),
                    "ours_bare_engine": lambda c, n: bare(c, n, max_tokens),
                },
                CLIENT_LEVELS, max_tokens, tokens_per_level, reps,
            )
        result["side_by_side"] = side
        result["ratios"] = [
            {
                "clients": clients,
                "ours_over_llama_server": ratio(side, "ours_http", "llama_server_http", clients),
                "ours_http_over_ours_bare": ratio(side, "ours_http", "ours_bare_engine", clients),
            }
            for clients in CLIENT_LEVELS
        ]
        checkpoint()
        print("bare llama.cpp ...", flush=True)
        prompt = result["prompt_tokens"]["llama_server"]
        result["llama_bench"] = llama_bench(gguf, prompt, max_tokens)
        result["llama_batched_bench"] = llama_batched_bench(gguf, prompt, max_tokens)

        checkpoint()
        print("tuning ...", flush=True)
        result["tuning"] = tune_in_isolation(saved, serve_env, scratch, max_tokens, rounds=2)
        checkpoint()

        print("profile ...", flush=True)
        result["profile"] = {str(batch): profile_decode(folder / "onnx", scratch / f"profile-{batch}", batch, 16)
                             for batch in (1, 4)}
        for batch in (1, 4):
            shutil.rmtree(scratch / f"profile-{batch}", ignore_errors=True)

    at = {row["clients"]: row for row in result["ratios"]}
    result["targets"] = {
        "1_client_ours_over_llama_server": {"target": 0.9, "measured": at[1]["ours_over_llama_server"]},
        "8_clients_ours_over_llama_server": {"target": 0.8, "measured": at[8]["ours_over_llama_server"]},
        "1_client_ours_http_over_bare": {"target": 0.95, "measured": at[1]["ours_http_over_ours_bare"]},
        "8_clients_ours_http_over_bare": {"target": 0.9, "measured": at[8]["ours_http_over_ours_bare"]},
    }
    result["wall_s"] = round(time.monotonic() - started)
    checkpoint()
    for clients in CLIENT_LEVELS:
        cells = []
        for name in side:
            row = next(r for r in side[name] if r["clients"] == clients)
            cells.append(f"{name} {row['tokens_per_s']:7.1f} tok/s (TTFT p50 {row['ttft_p50_ms'] or 0:.0f} ms, "
                         f"ITL p50 {row['itl_p50_ms'] or 0:.1f} ms)")
        print(f"{clients:>2} clients: " + "; ".join(cells))
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
