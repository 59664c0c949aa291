"""`make demo` and `make demo-down`, as a newcomer runs them, on a control plane of their own."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.cluster import REPO_ROOT
from tests.support.mlflow_server import free_port

pytestmark = pytest.mark.cluster

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def demo_processes(*markers: Path) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if any(str(marker).encode() in cmdline for marker in markers):
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace")[:200])
    return found


def test_make_demo_runs_the_product_and_demo_down_cleans_up(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PHI3_LOCALCLUSTER_DIR": str(tmp_path / "cluster"),
        "PHI3_LOCALCLUSTER_PORT_BASE": "36800",
        "PHI3_DEMO_DIR": str(tmp_path / "demo"),
        "PHI3_DEMO_MLFLOW_PORT": str(free_port()),
    }
    try:
        demo = subprocess.run(["make", "demo"], cwd=REPO_ROOT, env=env, text=True, capture_output=True, timeout=900)
        output = demo.stdout + demo.stderr
        assert demo.returncode == 0, output[-5000:]
        for expected in (
            "registered models:/phi3-mini/",
            "models:/phi3-mini@champion resolved to models:/phi3-mini/",
            "assistant: ",
            "simulated by kwok",
            "Deployment now fetches models:/phi3-mini/",
            "event ModelVersionChanged: rolling from models:/phi3-mini/",
            "Clean up with: make demo-down",
        ):
            assert expected in output, f"{expected!r} missing from the demo output:\n{output[-5000:]}"
        lines = output.splitlines()
        table = lines[lines.index(next(line for line in lines if "Deployment now fetches" in line)) + 2].split()
        assert table[:5] == ["phi3-mini", "cpu", "phi3-mini", table[3], "Ready"] and table[5] == "1/1"
    finally:
        down = subprocess.run(["make", "demo-down"], cwd=REPO_ROOT, env=env, text=True, capture_output=True,
                              timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert demo_processes(tmp_path / "cluster", tmp_path / "demo") == []
