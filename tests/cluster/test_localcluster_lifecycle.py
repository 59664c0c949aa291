"""`hack/localcluster` itself: idempotent up, status, and a down that leaves nothing behind.

It runs a second, independent control plane (own state dir and ports) so that the
session's shared cluster is not disturbed. A machine has one real node (its bridge, cgroups and
fixed paths are the host's), so this one runs without: tests/demo checks the real node's up and down.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.support.cluster import localcluster

pytestmark = pytest.mark.cluster

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def processes_under(state_dir: Path) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(state_dir).encode() in a for a in argv) and Path(argv[0].decode()).name in COMPONENTS:
            found.append(argv[0].decode())
    return found


def test_up_is_idempotent_and_down_leaves_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "lc"
    env = {"PHI3_LOCALCLUSTER_DIR": str(state_dir), "PHI3_LOCALCLUSTER_PORT_BASE": "36600",
           "PHI3_LOCALCLUSTER_REAL_NODE": "0"}
    try:
        first = localcluster("up", env=env)
        assert first.stdout.strip().splitlines()[-1] == f"export KUBECONFIG={state_dir / 'kubeconfig'}"
        pids_after_first = sorted((state_dir / "pids").iterdir())
        first_pids = [p.read_text() for p in pids_after_first]

        second = localcluster("up", env=env)
        assert second.stdout.strip().splitlines()[-1] == f"export KUBECONFIG={state_dir / 'kubeconfig'}"
        assert [p.read_text() for p in sorted((state_dir / "pids").iterdir())] == first_pids, (
            "a second `up` must reuse the running processes"
        )

        status = localcluster("status", env=env)
        for component in COMPONENTS:
            assert f"{component:<24} healthy" in status.stdout
        assert sorted(Path(p).name for p in processes_under(state_dir)) == sorted(COMPONENTS)
    finally:
        localcluster("down", env=env)

    assert processes_under(state_dir) == []
    after = localcluster("status", env=env, check=False)
    assert after.returncode != 0
    assert "stopped" in after.stdout
