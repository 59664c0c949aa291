"""Fixtures shared by every tier that needs the local control plane."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, localcluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The local control plane: reused when it already runs, else started and stopped afterwards."""
    status = localcluster("status", check=False)
    started_here = status.returncode != 0
    if started_here:
        localcluster("up")
    kubeconfig = Path(localcluster("kubeconfig").stdout.strip())
    yield Cluster(kubeconfig=kubeconfig)
    if started_here and not os.environ.get("PHI3_KEEP_CLUSTER"):
        localcluster("down")


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, named after it."""
    prefix = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")
    name = cluster.create_namespace(prefix)
    yield name
    cluster.delete_namespace(name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """tests/demo takes the machine's one cluster down when it ends (`make demo-down`): it runs last."""
    items.sort(key=lambda item: "tests/demo/" in item.nodeid)
