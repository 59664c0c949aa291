"""The tests' Prometheus (`build-prometheus`), which `hack/images build prometheus` packages."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..build import go_env
from ..config import PROMETHEUS_DIR, PROMETHEUS_VERSION, log, run


def build_prometheus() -> Path:
    if (PROMETHEUS_DIR / "prometheus").is_file():
        return PROMETHEUS_DIR
    log(f"building {PROMETHEUS_DIR.name} (cached in {PROMETHEUS_DIR}; the first build takes minutes)")
    started = time.monotonic()
    out = PROMETHEUS_DIR.with_name(PROMETHEUS_DIR.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run(["go", "install", "-trimpath", "-tags", "netgo", "-ldflags", "-s -w",
         f"github.com/prometheus/prometheus/cmd/prometheus@{PROMETHEUS_VERSION}"],
        env={**go_env(), "GOFLAGS": "", "GOBIN": str(out)})
    out.rename(PROMETHEUS_DIR)
    log(f"built {PROMETHEUS_DIR.name} in {time.monotonic() - started:.0f}s")
    return PROMETHEUS_DIR
