"""Helpers for the Helm chart tests: helm, token kubeconfigs, releases."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.cluster import REPO_ROOT, Cluster

CHART_DIR = REPO_ROOT / "charts" / "phi3-operator"


class Helm:
    """The cached helm binary, run against the local control plane when one is given."""

    def __init__(self, binary: str, cluster: Cluster | None = None) -> None:
        self.binary = binary
        self.cluster = cluster

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = self.cluster.env if self.cluster is not None else None
        proc = subprocess.run([self.binary, *args], env=env, text=True, capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def template(self, *args: str, namespace: str = "phi3-system", release: str = "phi3") -> list[dict[str, Any]]:
        out = self.run("template", release, str(CHART_DIR), "--namespace", namespace, *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


def token_kubeconfig(cluster: Cluster, token: str, path: Path) -> Path:
    """A kubeconfig that authenticates with `token`, on the admin kubeconfig's server and CA."""
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    context_name = admin["current-context"]
    context = next(c["context"] for c in admin["contexts"] if c["name"] == context_name)
    server = dict(next(c["cluster"] for c in admin["clusters"] if c["name"] == context["cluster"]))
    ca_file = server.get("certificate-authority")
    if ca_file and not Path(ca_file).is_absolute():
        server["certificate-authority"] = str((cluster.kubeconfig.parent / ca_file).resolve())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": server}],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "token", "context": {"cluster": "local", "user": "token"}}],
        "current-context": "token",
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class Releases:
    """Helm releases a test installs into its namespace; all are uninstalled afterwards."""

    def __init__(self, helm: Helm, namespace: str) -> None:
        self.helm = helm
        self.namespace = namespace
        self.names: list[str] = []

    def install(self, name: str, *args: str) -> None:
        self.names.append(name)
        self.helm.run("install", name, str(CHART_DIR), "--namespace", self.namespace,
                      "--wait", "--timeout", "180s", *args)

    def uninstall_all(self) -> None:
        for name in reversed(self.names):
            self.helm.run("uninstall", name, "--namespace", self.namespace, "--wait", "--timeout", "120s",
                          check=False)
        self.names.clear()


HEALTH_LUA = CHART_DIR / "argocd" / "health.lua"
TESTDATA_HEALTH = Path(__file__).parent / "testdata" / "health"


def lua_literal(value: Any) -> str:
    """`value` (decoded JSON/YAML) as a Lua expression, the way Argo CD hands `obj` to a health check."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    # Strings: every byte outside printable ASCII, and quote and backslash, as a decimal escape.
    return '"' + "".join(
        chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}" for b in str(value).encode()
    ) + '"'


def argocd_health(lua: str, obj: dict[str, Any], script: Path = HEALTH_LUA) -> tuple[str, str]:
    """Run the Argo CD health check on `obj` with a real Lua interpreter: (status, message)."""
    harness = "\n".join([
        f"obj = {lua_literal(obj)}",
        f"local hs = dofile({lua_literal(str(script))})",
        'io.write(tostring(hs.status), "\\n", tostring(hs.message or ""))',
    ])
    proc = subprocess.run([lua, "-"], input=harness, text=True, capture_output=True, timeout=30)
    if proc.returncode != 0:
        raise AssertionError(f"{script.name} failed under {lua}: {proc.stderr.strip()}")
    status, _, message = proc.stdout.partition("\n")
    return status, message


@dataclass(frozen=True)
class AuditedWrite:
    user: str
    verb: str
    resource: str
    name: str
    decision: str
    code: int


class AuditLog:
    """The local API server's audit log (writes only, see hack/localcluster), read from a mark on."""

    def __init__(self, cluster: Cluster) -> None:
        self.path = cluster.kubeconfig.parent / "audit.log"
        self.mark = self.path.stat().st_size if self.path.exists() else 0

    def writes(self, namespace: str) -> list[AuditedWrite]:
        size = self.path.stat().st_size
        start = self.mark if size >= self.mark else 0  # rotated meanwhile: read the new file whole
        found = []
        with open(self.path, "rb") as log:
            log.seek(start)
            for line in log:
                event = json.loads(line)
                ref = event.get("objectRef") or {}
                if ref.get("namespace") != namespace:
                    continue
                resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
                found.append(AuditedWrite(
                    user=event["user"]["username"],
                    verb=event["verb"],
                    resource=resource,
                    name=ref.get("name", ""),
                    decision=(event.get("annotations") or {}).get("authorization.k8s.io/decision", ""),
                    code=int((event.get("responseStatus") or {}).get("code", 0)),
                ))
        return found
