"""Toxiproxy, the fault tests' TCP proxy: built with `build --test-tools` or when `which` first asks."""

from __future__ import annotations

import shutil

from ..build import go_env
from ..config import TOXIPROXY_BIN_DIR, TOXIPROXY_VERSION, run


def build_toxiproxy() -> None:
    """Toxiproxy (a TCP proxy that injects latency, bandwidth limits, resets and cuts) for the fault tests;
    `go install` names its commands `server` and `cli`, its releases toxiproxy-server and toxiproxy-cli."""
    module = "github.com/Shopify/toxiproxy/v2/cmd/"
    out = TOXIPROXY_BIN_DIR.with_name(TOXIPROXY_BIN_DIR.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**go_env(), "GOBIN": str(out), "GOFLAGS": "-buildvcs=false"}
    run(["go", "install", "-trimpath", "-ldflags", "-s -w",
         f"{module}server@{TOXIPROXY_VERSION}", f"{module}cli@{TOXIPROXY_VERSION}"], env=env)
    (out / "server").rename(out / "toxiproxy-server")
    (out / "cli").rename(out / "toxiproxy-cli")
    out.rename(TOXIPROXY_BIN_DIR)
