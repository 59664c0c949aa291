"""A generated build Dockerfile really builds: buildah (daemonless) on a Debian base made by debootstrap.

The base stands in for the catalog runtime image: Debian bookworm with Python in a venv on PATH
and a uid-1000 user, which is what images/mlserver-cpu provides. The build installs a real
package from PyPI, as an in-cluster build does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from phi3_operator.builders.build import BuildRequest, build_context_configmap

pytestmark = pytest.mark.slow

CACHE = Path(os.environ.get("PHI3_CACHE_DIR", Path.home() / ".cache" / "phi3-operator"))
ROOTFS_TAR = CACHE / "debootstrap" / "bookworm-minbase-python.tar"
BASE_IMAGE = "localhost/phi3-test-runtime-base:bookworm"
BUILDAH = ["buildah", "--storage-driver", "vfs", "--root", str(CACHE / "buildah" / "root"),
           "--runroot", str(CACHE / "buildah" / "run")]


def sh(*cmd: str, timeout: float = 900) -> str:
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}")
    return proc.stdout


def ensure_tools() -> None:
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        sh("apt-get", "install", "-y", "-qq", *missing)


def ensure_rootfs(tmp: Path) -> None:
    if ROOTFS_TAR.is_file():
        return
    ROOTFS_TAR.parent.mkdir(parents=True, exist_ok=True)
    target = tmp / "rootfs"
    sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
       str(target), "http://deb.debian.org/debian", timeout=1800)
    partial = ROOTFS_TAR.with_suffix(".partial")
    sh("tar", "-C", str(target), "-cf", str(partial), ".")
    partial.rename(ROOTFS_TAR)


def ensure_base_image() -> None:
    if subprocess.run([*BUILDAH, "inspect", BASE_IMAGE], capture_output=True).returncode == 0:
        return
    container = sh(*BUILDAH, "from", "scratch").strip()
    try:
        mount = sh(*BUILDAH, "mount", container).strip()
        sh("tar", "-C", mount, "-xf", str(ROOTFS_TAR))
        run = [*BUILDAH, "run", "--isolation", "chroot", container, "--"]
        sh(*run, "python3", "-m", "venv", "/opt/venv")
        sh(*run, "useradd", "--uid", "1000", "--create-home", "runtime")
        sh(*BUILDAH, "config", "--env", "PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin", "--user", "1000:1000",
           container)
        sh(*BUILDAH, "commit", container, BASE_IMAGE)
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ensure_tools()
    ensure_rootfs(tmp_path_factory.mktemp("debootstrap"))
    ensure_base_image()
    yield BASE_IMAGE


def test_generated_dockerfile_builds_and_installs_the_requirements(base_image: str, tmp_path: Path) -> None:
    request = BuildRequest(
        base_image=base_image,
        requirements=("six==1.16.0",),
        registry="localhost/phi3-test",
        namespace="unused",
        builder_image="unused",
    )
    context = build_context_configmap(request)["data"]
    for name, text in context.items():
        (tmp_path / name).write_text(text)
    tag = f"localhost/phi3-test-built:{request.tag}"
    # This machine reaches PyPI through an egress proxy with its own CA; the build gets the host's bundle.
    host_ca = "/etc/ssl/certs/ca-certificates.crt"
    sh(*BUILDAH, "bud", "--isolation", "chroot", "--layers=false", "-v", f"{host_ca}:/run/host-ca.crt:ro",
       "--build-arg", "PIP_CERT=/run/host-ca.crt", "-f", str(tmp_path / "Dockerfile"), "-t", tag, str(tmp_path))
    try:
        config = json.loads(sh(*BUILDAH, "inspect", "--type", "image", tag))
        assert config["OCIv1"]["config"]["User"] == "1000:1000", "the built image must run as non-root"
        container = sh(*BUILDAH, "from", tag).strip()
        try:
            version = sh(*BUILDAH, "run", "--isolation", "chroot", container, "--",
                         "python", "-c", "import six; print(six.__version__)")
            whoami = sh(*BUILDAH, "run", "--isolation", "chroot", container, "--", "id", "-u")
        finally:
            subprocess.run([*BUILDAH, "rm", container], capture_output=True)
        assert version.strip() == "1.16.0"
        assert whoami.strip() == "1000"
    finally:
        subprocess.run([*BUILDAH, "rmi", tag], capture_output=True)
