"""The MLflow test server survives a stop and a restart on the same port with its data intact."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.serving


def test_stop_and_restart_keeps_port_and_data(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        MlflowClient(server.tracking_uri).create_registered_model("outage-probe")
        port = server.port
        server.stop()
        assert not server.running
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{server.tracking_uri}/health", timeout=2)
        server.start()
        assert server.port == port
        assert MlflowClient(server.tracking_uri).get_registered_model("outage-probe").name == "outage-probe"
    finally:
        server.stop()
