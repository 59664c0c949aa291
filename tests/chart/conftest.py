"""Fixtures for the Helm chart tests: helm, lua, the CRD, a real MLflow model, releases."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chart.helpers import Helm, Releases
from tests.support.cluster import Cluster, cached_binary
from tests.support.operator import install_crd


@pytest.fixture(scope="session")
def helm_bin() -> str:
    return cached_binary("helm")


@pytest.fixture(scope="session")
def helm(helm_bin: str) -> Helm:
    """helm without a cluster: lint and template."""
    return Helm(helm_bin)


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> Cluster:
    install_crd(cluster)
    return cluster


@pytest.fixture(scope="session")
def cluster_helm(helm_bin: str, crd: Cluster) -> Helm:
    """helm against the local control plane, with the Phi3Model CRD installed."""
    return Helm(helm_bin, crd)


@pytest.fixture(scope="session")
def lua() -> str:
    """A Lua interpreter for the Argo CD health check; Debian: apt-get install -y lua5.4."""
    for name in ("lua5.4", "lua"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no Lua interpreter on PATH: the Argo CD health tests need `lua5.4` or `lua` "
                "(Debian/Ubuntu: apt-get install -y lua5.4)")


@pytest.fixture(scope="session")
def pyfunc_model_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real MLflow pyfunc model saved locally; the operator reads its MLmodel through a file: URI."""
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined,unused-ignore]
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return model_input

    path = tmp_path_factory.mktemp("models") / "echo"
    mlflow.pyfunc.save_model(path=str(path), python_model=Echo(), pip_requirements=["mlflow"])
    return Path(path).as_uri()


@pytest.fixture
def releases(cluster_helm: Helm, namespace: str) -> Iterator[Releases]:
    installed = Releases(cluster_helm, namespace)
    yield installed
    installed.uninstall_all()
