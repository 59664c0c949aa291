"""Session fixtures for the serving tier: one tiny model, one real MLflow server, and each flavor
packaged, fetched and served once through the real CLI."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.mlflow_server import MlflowServer
from tests.support.serving import ServedProcess, package, run_cli
from tests.support.tiny_model import TinyModel, build_tiny_model

FLAVORS = ("onnx", "transformers")
REGISTERED_NAMES = {"onnx": "tiny-onnx", "transformers": "tiny-hf"}
ALIAS = "champion"
# What the operator sets from spec.generation; the tests check the runtime honours them.
DEFAULT_MAX_TOKENS = 24
# What the operator sets from spec.serving.maxBatchSize; small, so that batches fill and queue.
MAX_BATCH_SIZE = 2


@dataclass(frozen=True)
class Served:
    flavor: str
    process: ServedProcess
    model_uri: str  # the registry URI it was fetched from

    @property
    def name(self) -> str:
        return self.process.model_name


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def onnx_model_dir(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ONNX model as `package onnx` logs it, saved to a folder (no registry): for tests
    that serve it with an environment of their own."""
    from phi3_serving.packaging import save_onnx_model

    return save_onnx_model(tiny_model.onnx_dir, tmp_path_factory.mktemp("onnx-mlflow-model") / "model")


def onnx_process(model_dir: Path, name: str, workdir: Path, env: Mapping[str, str]) -> ServedProcess:
    """`serve` of the ONNX model as the `served` fixture runs it, plus `env`."""
    base = {
        "PHI3_ONNX_VARIANT": "cpu-int4",
        "PHI3_MAX_TOKENS": str(DEFAULT_MAX_TOKENS),
        "PHI3_MAX_BATCH_SIZE": str(MAX_BATCH_SIZE),
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
    }
    return ServedProcess(str(model_dir), name, workdir / "serve.log", env={**base, **env})


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def packaged(tiny_model: TinyModel, mlflow_server: MlflowServer) -> dict[str, str]:
    """flavor -> the `models:/N/V` URI that `phi3-operator package` printed."""
    sources = {"onnx": tiny_model.onnx_dir, "transformers": tiny_model.hf_dir}
    return {
        flavor: package(
            flavor, sources[flavor], name=REGISTERED_NAMES[flavor], tracking_uri=mlflow_server.tracking_uri, alias=ALIAS
        )
        for flavor in FLAVORS
    }


@pytest.fixture(scope="session", params=FLAVORS)
def served(
    request: pytest.FixtureRequest,
    packaged: dict[str, str],
    mlflow_server: MlflowServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """The model as the Deployment runs it: `fetch` by alias into a folder, then `serve` that folder."""
    flavor: str = request.param
    workdir = tmp_path_factory.mktemp(f"served-{flavor}")
    dest = workdir / "models" / "model"
    alias_uri = f"models:/{REGISTERED_NAMES[flavor]}@{ALIAS}"
    fetched = run_cli(
        "fetch", "--model-uri", alias_uri, "--dest", str(dest), env={"MLFLOW_TRACKING_URI": mlflow_server.tracking_uri}
    )
    assert fetched.returncode == 0, fetched.stderr
    env = {
        "PHI3_ONNX_VARIANT": "cpu-int4",
        "PHI3_MAX_TOKENS": str(DEFAULT_MAX_TOKENS),
        "PHI3_TEMPERATURE": "0.7",
        "PHI3_TOP_P": "0.95",
        "PHI3_MAX_BATCH_SIZE": str(MAX_BATCH_SIZE),
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
    }
    process = ServedProcess(str(dest), f"tiny-{flavor}", workdir / "serve.log", env=env)
    with process:
        yield Served(flavor=flavor, process=process, model_uri=packaged[flavor])
