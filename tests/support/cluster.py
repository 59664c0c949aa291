"""The local control plane as the tests see it: `hack/localcluster` plus real `kubectl`."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCALCLUSTER = REPO_ROOT / "hack" / "localcluster"


def localcluster(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(LOCALCLUSTER), *args],
        env={**os.environ, **(env or {})},
        text=True,
        capture_output=True,
        timeout=3600,
    )
    if check and proc.returncode != 0:
        # Its stderr says which component failed and why; a bare exit status would hide that.
        raise RuntimeError(f"hack/localcluster {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def cached_binary(name: str) -> str:
    return localcluster("which", name).stdout.strip().splitlines()[-1]


@dataclass
class Cluster:
    kubeconfig: Path
    kubectl_bin: str = field(default_factory=lambda: cached_binary("kubectl"))

    @property
    def env(self) -> dict[str, str]:
        """Environment for child processes (operator, helm) that must reach this cluster."""
        bin_dir = str(Path(self.kubectl_bin).parent)
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def get(self, kind: str, name: str = "", namespace: str | None = None, managed_fields: bool = False) -> Any:
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        if managed_fields:
            args.append("--show-managed-fields")
        if namespace:
            args += ["-n", namespace]
        return json.loads(self.kubectl(*args).stdout)

    def exists(self, kind: str, name: str, namespace: str | None = None) -> bool:
        args = ["get", kind, name, "--ignore-not-found", "-o", "name"]
        if namespace:
            args += ["-n", namespace]
        return bool(self.kubectl(*args).stdout.strip())

    def apply(self, manifest: dict[str, Any] | list[dict[str, Any]], namespace: str | None = None) -> None:
        items = manifest if isinstance(manifest, list) else [manifest]
        args = ["apply", "--server-side", "--field-manager=tests", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        self.kubectl(*args, stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    def create_namespace(self, prefix: str) -> str:
        name = f"{prefix[:40].rstrip('-')}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        return name

    def delete_namespace(self, name: str) -> None:
        self.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")
