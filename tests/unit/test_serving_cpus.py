"""How the runtime sizes onnxruntime's threads on CPU: the cgroup quota, the affinity, the override."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi3_serving.cpus import (
    ENV_CPU_THREADS,
    cgroup_cpu_limit,
    cpu_session_options,
    parse_cpu_max,
    usable_cpus,
)
from phi3_serving.onnx_engine import runtime_session_options


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5), ("50000 100000", 0.5), ("", None)],
)
def test_cpu_max_reads_as_cpus(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


def test_cgroup_v2_then_v1(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 4.0


@pytest.mark.parametrize(
    ("limit", "affinity", "cpus"),
    [(None, 64, 64), (2.0, 64, 2), (1.5, 64, 2), (0.5, 64, 1), (8.0, 4, 4), (None, 0, 1)],
)
def test_usable_cpus_are_the_quota_rounded_up_in_the_affinity(limit: float | None, affinity: int, cpus: int) -> None:
    assert usable_cpus(limit, affinity) == cpus


def test_the_threads_are_the_usable_cpus_not_the_nodes() -> None:
    assert cpu_session_options({}, {}, 2.0, 64) == {"intra_op_num_threads": 2}
    assert cpu_session_options({}, {}, None, 8) == {"intra_op_num_threads": 8}
    assert cpu_session_options({}, {}, 0.5, 8) == {"intra_op_num_threads": 1}


def test_the_models_own_settings_stay_and_the_variable_wins() -> None:
    own = {"intra_op_num_threads": 3, "session.intra_op.allow_spinning": "1"}
    assert cpu_session_options(own, {}, None, 8) == {}
    assert cpu_session_options(own, {ENV_CPU_THREADS: "5"}, None, 8) == {"intra_op_num_threads": 5}


@pytest.mark.parametrize("raw", ["0", "257", "two", "1.5"])
def test_a_bad_thread_count_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=ENV_CPU_THREADS):
        cpu_session_options({}, {ENV_CPU_THREADS: raw}, None, 8)


def test_cuda_models_are_left_alone() -> None:
    cuda = {"model": {"decoder": {"session_options": {"provider_options": [{"cuda": {}}]}}}}
    assert runtime_session_options(cuda, {ENV_CPU_THREADS: "4"}) == {}
    cpu = {"model": {"decoder": {"session_options": {"provider_options": []}}}}
    assert runtime_session_options(cpu, {ENV_CPU_THREADS: "4"}) == {"intra_op_num_threads": 4}
