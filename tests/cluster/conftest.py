"""Fixtures for operator tests: the CRD, a real operator process, a real MLflow model on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.cluster import Cluster
from tests.support.mlflow_server import MlflowServer, free_port
from tests.support.operator import OperatorProcess, install_crd, operator_env
from tests.support.realnode import BRIDGE_ADDRESS, NODE_NAME, RealPath, build_images
from tests.support.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> Cluster:
    install_crd(cluster)
    return cluster


@pytest.fixture(scope="session")
def operator(crd: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    process = OperatorProcess(
        cluster=crd,
        args=("--metrics-address", f"127.0.0.1:{free_port()}"),
        log_path=tmp_path_factory.mktemp("operator") / "operator.log",
        extra_env={**operator_env(resync_s=3.0, refresh_s=3.0),
                   "PHI3_OPERATOR_CONFIG": str(Path(__file__).parent / "testdata" / "operator-config.yaml")},
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def pyfunc_model_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real MLflow pyfunc model saved locally; the operator reads its MLmodel through a file: URI."""
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return model_input

    path = tmp_path_factory.mktemp("models") / "echo"
    mlflow.pyfunc.save_model(path=str(path), python_model=Echo(), pip_requirements=["mlflow"])
    return Path(path).as_uri()


@pytest.fixture(scope="module")
def real_path(crd: Cluster, operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealPath]:
    node = crd.get("node", NODE_NAME)
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
    images = build_images("mlserver-cpu")
    workdir = tmp_path_factory.mktemp("realnode")
    tiny = build_tiny_model(tmp_path_factory.mktemp("tiny-real"))
    # Fresh names each run: a namespace from an earlier run may still be terminating.
    namespace = crd.create_namespace("phi3-real")
    restricted = crd.create_namespace("phi3-restricted")
    crd.kubectl("label", "--overwrite", "namespace", restricted, "pod-security.kubernetes.io/enforce=restricted",
                "pod-security.kubernetes.io/enforce-version=latest")
    # The session's operator (it watches every namespace) serves these models too; its catalog names
    # images that exist nowhere, so the models name the runtime image just built (`image.override`).
    with MlflowServer(workdir / "mlflow", host=BRIDGE_ADDRESS) as mlflow:
        try:
            yield RealPath(crd, mlflow, tiny.onnx_dir, images, operator, namespace, restricted)
        finally:
            for name in (namespace, restricted):
                crd.delete_namespace(name)
