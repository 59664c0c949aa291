"""Fixtures for operator tests: the CRD, a real operator process, a real MLflow model on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.cluster import Cluster
from tests.support.mlflow_server import free_port
from tests.support.operator import OperatorProcess, install_crd, operator_env


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
