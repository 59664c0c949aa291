"""How many onnxruntime threads a CPU model runs.

onnxruntime sizes its intra-op pool from the machine's cores, not from the container's CPU limit, so a
pod limited to 2 CPUs on a 64-core node would start 64 threads and be throttled. The runtime therefore
counts the CPUs it may use (its affinity, capped by the cgroup's CPU quota rounded up) and gives
onnxruntime that many, unless the model's genai_config sets a count; `spec.serving.cpuThreads`
(PHI3_CPU_THREADS) overrides both. Measured by `bench/cpu_peer.py` on 2 cores, one server at a time:
all cores with onnxruntime's busy-waiting left on serve fastest (1 thread: 0.6x at 1 and 8 clients;
spinning off: the same at 1 client, 0.9x at 8), so spinning is left as onnxruntime sets it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_CPU_THREADS = "PHI3_CPU_THREADS"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Config entries onnxruntime reads from the session options (genai_config passes unknown keys on): what
# the bench varies; the runtime leaves them to the model.
SPINNING_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD" for no limit) as a number of CPUs."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return _quota_in_cpus(float(parts[0]), float(parts[1]))


def _quota_in_cpus(quota: float, period: float) -> float | None:
    """A CFS quota over its period; None for "no limit" (v1 writes -1)."""
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The container's CPU quota in CPUs (cgroup v2, else v1), or None when it has none."""
    try:
        return parse_cpu_max((root / "cpu.max").read_text())
    except OSError:
        pass
    try:
        quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _quota_in_cpus(quota, period)


def usable_cpus(limit: float | None, affinity: int) -> int:
    """The CPUs this process may keep busy: its affinity, capped by a quota rounded up."""
    if limit is None:
        return max(1, affinity)
    return max(1, min(affinity, math.ceil(limit - 1e-9)))


def threads_from_env(env: Mapping[str, str]) -> int | None:
    raw = env.get(ENV_CPU_THREADS, "")
    if not raw:
        return None
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if not 1 <= threads <= 256:
        raise ValueError(f"{ENV_CPU_THREADS} must be an integer from 1 to 256, got {raw!r}")
    return threads


def cpu_session_options(
    model_options: Mapping[str, Any], env: Mapping[str, str], limit: float | None, affinity: int
) -> dict[str, Any]:
    """What the runtime adds to a CPU model's decoder session options.

    PHI3_CPU_THREADS wins; otherwise the model's own `intra_op_num_threads` stays, and only where it has
    none are the usable CPUs counted.
    """
    threads = threads_from_env(env)
    if threads is None and "intra_op_num_threads" not in model_options:
        threads = usable_cpus(limit, affinity)
    return {} if threads is None else {"intra_op_num_threads": threads}


def this_process_affinity() -> int:
    return len(os.sched_getaffinity(0))
