"""Write images/<name>/packages.txt: the exact packages each image carries.

    .venv/bin/python images/lock_packages.py [--upgrade] [operator mlserver-cpu mlserver-torch-cpu mlserver-cuda mlflow]

Resolves the project's `serving` extra (plus the image's additions) with pip's resolver for
CPython 3.11 on manylinux x86_64, without installing anything, and writes `name==version`
lines. The Dockerfiles install exactly these (`--no-deps`), and the operator's image catalog
reads the same file (LABEL ai.phi3.packages), so what an image declares is what it has.
The pins already in a packages.txt are kept where the requirements allow; --upgrade takes the newest.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION = "3.11"
# Images of other projects' servers (the demo's in-cluster MLflow), which carry no phi3-operator.
SERVER_ONLY_IMAGES = ("mlflow",)
# What an image leaves out of its resolution, and why; its Dockerfile's pip check allows exactly these.
LEFT_OUT = {
    # triton compiles GPU kernels for torch.compile (about 1 GB); eager torch on a CPU never imports it.
    "mlserver-torch-cpu": ("triton",),
}
# An image that is another plus more keeps that one's pins, so what serves on one serves on both.
EXTENDS = {"mlserver-torch-cpu": "mlserver-cpu"}
# The images' base, python:3.11-slim-bookworm, has glibc 2.36: every manylinux tag up to it fits.
PLATFORMS = (*(f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)), "manylinux2014_x86_64", "linux_x86_64")


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def project() -> dict[str, object]:
    data: dict[str, object] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return data


def image_requirements(image: str) -> list[str]:
    meta = project()
    base = list(meta["dependencies"])  # type: ignore[call-overload]
    serving = list(meta["optional-dependencies"]["serving"])  # type: ignore[index]
    dev = {_name(r): r for r in meta["optional-dependencies"]["dev"]}  # type: ignore[index]
    if image == "operator":
        return base + list(meta["optional-dependencies"]["operator"])  # type: ignore[index]
    if image == "mlflow":
        # The tracking server alone, at the pin the tests' own server runs.
        return [dev["mlflow"]]
    if image == "mlserver-cpu":
        return base + serving
    if image == "mlserver-torch-cpu":
        # PyPI's Linux torch is the CUDA build; without the nvidia-* libraries its shared objects link
        # against (libcudart, cuBLAS, cuDNN, NCCL, ...) `import torch` fails even on a CPU, so they stay.
        return [*base, *serving, dev["torch"]]
    if image == "mlserver-cuda":
        # The CUDA build of onnxruntime-genai replaces the CPU one; torch (its PyPI wheel is the
        # CUDA one) serves the transformers flavor on the GPU. CUDA and cuDNN come as pip wheels,
        # so the image needs only the host's NVIDIA driver.
        genai = next(r for r in serving if _name(r) == "onnxruntime-genai")
        cuda_genai = genai.replace("onnxruntime-genai", "onnxruntime-genai-cuda", 1)
        kept = [r for r in serving if _name(r) != "onnxruntime-genai"]
        return [*base, *kept, cuda_genai, "onnxruntime-gpu[cuda,cudnn]", dev["torch"]]
    raise SystemExit(f"unknown image {image!r}")


def current_pins(image: str) -> list[str]:
    """The image's packages.txt as it stands, less the project itself."""
    target = REPO_ROOT / "images" / image / "packages.txt"
    if not target.is_file():
        return []
    lines = (line.strip() for line in target.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#") and not line.startswith("phi3-operator==")]


def resolve(requirements: list[str], keep: list[str]) -> dict[str, str]:
    """pip's resolution of `requirements`; a package already pinned in `keep` stays at its pin unless a
    requirement rules it out (then pip says which), so a change of one requirement moves only what it must."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        constraints = Path(scratch) / "constraints.txt"
        constraints.write_text("".join(f"{pin}\n" for pin in keep))
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--report", str(report), "--only-binary=:all:", "--implementation", "cp",
            "--python-version", PYTHON_VERSION,
            *[argument for platform in PLATFORMS for argument in ("--platform", platform)],
            "--constraint", str(constraints), *requirements,
        ]  # fmt: skip
        subprocess.run(command, check=True)
        installs = json.loads(report.read_text())["install"]
    return {_name(item["metadata"]["name"]): item["metadata"]["version"] for item in installs}


def write(image: str, upgrade: bool) -> Path:
    keep = [] if upgrade else current_pins(image)
    if image in EXTENDS:
        keep = [*current_pins(EXTENDS[image]), *keep]
    pins = resolve(image_requirements(image), keep)
    for name in LEFT_OUT.get(image, ()):
        pins.pop(name, None)
    version = str(project()["version"])
    lines = [f"{name}=={pins[name]}" for name in sorted(pins)]
    header = [f"# Packages in the {image} image (generated by images/lock_packages.py; do not edit by hand)."]
    if image in SERVER_ONLY_IMAGES:
        header.append("# The image installs exactly these.")
        project_line = []
    else:
        header.append("# The image installs exactly these; the operator's image catalog reads this file.")
        project_line = [f"phi3-operator=={version}"]
    target = REPO_ROOT / "images" / image / "packages.txt"
    target.write_text("\n".join([*header, *lines, *project_line, ""]))
    return target


def main(argv: list[str]) -> int:
    upgrade = "--upgrade" in argv
    argv = [argument for argument in argv if argument != "--upgrade"]
    for image in argv or ["operator", "mlserver-cpu", "mlserver-torch-cpu", "mlserver-cuda", *SERVER_ONLY_IMAGES]:
        print(f"wrote {write(image, upgrade)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
