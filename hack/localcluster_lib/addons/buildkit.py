"""BuildKit and RootlessKit (`build-buildkit`), which `hack/images build buildkit` packages."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..build import go_env
from ..config import BUILDKIT_BIN_DIR, BUILDKIT_BINARIES, BUILDKIT_VERSION, CACHE_DIR, ROOTLESSKIT_VERSION, log, run


def build_buildkit() -> Path:
    """buildkitd, buildctl and rootlesskit, static. BuildKit's go.mod has `exclude` lines, which `go install
    pkg@version` refuses, so a wrapper module requires both modules and builds their commands."""
    if all((BUILDKIT_BIN_DIR / name).is_file() for name in BUILDKIT_BINARIES):
        return BUILDKIT_BIN_DIR
    log(f"building {BUILDKIT_BIN_DIR.name} (cached in {BUILDKIT_BIN_DIR}; the first build takes minutes)")
    started = time.monotonic()
    src = CACHE_DIR / "src" / BUILDKIT_BIN_DIR.name
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(
        "module phi3operator.local/buildkitbuild\n\ngo 1.26\n\nrequire (\n"
        f"\tgithub.com/moby/buildkit {BUILDKIT_VERSION}\n"
        f"\tgithub.com/rootless-containers/rootlesskit/v2 {ROOTLESSKIT_VERSION}\n)\n"
    )
    # Blank imports keep `go mod tidy` from dropping the requirements; this file is never built.
    (src / "tools.go").write_text(
        "//go:build tools\n\npackage tools\n\nimport (\n"
        '\t_ "github.com/moby/buildkit/cmd/buildctl"\n\t_ "github.com/moby/buildkit/cmd/buildkitd"\n'
        '\t_ "github.com/rootless-containers/rootlesskit/v2/cmd/rootlesskit"\n)\n'
    )
    run(["go", "mod", "tidy"], cwd=src, env=go_env())
    out = BUILDKIT_BIN_DIR.with_name(BUILDKIT_BIN_DIR.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # The tags are the ones BuildKit's own static release builds use.
    run(["go", "build", "-trimpath", "-tags", "osusergo netgo static_build", "-ldflags",
         f"-s -w -X github.com/moby/buildkit/version.Version={BUILDKIT_VERSION}", "-o", str(out) + "/",
         "github.com/moby/buildkit/cmd/buildctl", "github.com/moby/buildkit/cmd/buildkitd",
         "github.com/rootless-containers/rootlesskit/v2/cmd/rootlesskit"], cwd=src, env=go_env())
    out.rename(BUILDKIT_BIN_DIR)
    log(f"built {BUILDKIT_BIN_DIR.name} in {time.monotonic() - started:.0f}s")
    return BUILDKIT_BIN_DIR
