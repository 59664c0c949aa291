"""The data-plane CLI's pure parts: argument handling, settings, URIs."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi3_serving.cli import build_parser, main
from phi3_serving.fetch import already_fetched, mask_uri
from phi3_serving.serve import ServeOptions, default_model_name, model_settings, resolve_local_uri, server_settings


def test_usage_errors_exit_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["package", "onnx"]) == 2
    assert main(["serve"]) == 2
    assert main(["teleport"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "--model-uri" in err


def test_serve_defaults_are_the_container_ports() -> None:
    args = build_parser().parse_args(["serve", "--model-uri", "/models/model"])
    assert (args.http_port, args.grpc_port, args.metrics_port, args.host) == (8080, 8081, 8082, "0.0.0.0")


def test_package_arguments() -> None:
    args = build_parser().parse_args(["package", "onnx", "dir", "--name", "n", "--alias", "a", "--tracking-uri", "u"])
    assert (args.flavor, args.model_dir, args.name, args.alias, args.tracking_uri) == (
        "onnx",
        Path("dir"),
        "n",
        "a",
        "u",
    )


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("models:/phi3-mini/7", "phi3-mini"),
        ("models:/phi3-mini@champion", "phi3-mini"),
        ("/models/model", "model"),
        ("runs:/abc/model", "model"),
        ("/", "model"),
    ],
)
def test_default_model_name(uri: str, name: str) -> None:
    assert default_model_name(uri) == name


def test_relative_local_uri_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_local_uri("model") == str(tmp_path / "model")
    assert resolve_local_uri("models:/x/1") == "models:/x/1"


def test_server_settings_enable_streaming_and_avoid_the_read_only_root(tmp_path: Path) -> None:
    options = ServeOptions(model_uri="/models/model", model_name="phi3", host="127.0.0.1", http_port=1)
    settings = server_settings(options, tmp_path)
    assert settings["parallel_workers"] == 0
    assert settings["gzip_enabled"] is False
    assert settings["metrics_dir"].startswith(str(tmp_path))
    assert settings["environments_dir"].startswith(str(tmp_path))
    assert model_settings(options) == {
        "name": "phi3",
        "implementation": "phi3_serving.runtime.Phi3Runtime",
        "parameters": {"uri": "/models/model"},
    }


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://user:s3cret@mlflow.example.com/x", "https://user:***@mlflow.example.com/x"),
        ("https://user:s3cret@mlflow.example.com:8443/x", "https://user:***@mlflow.example.com:8443/x"),
        ("models:/phi3/1", "models:/phi3/1"),
    ],
)
def test_mask_uri(uri: str, shown: str) -> None:
    assert mask_uri(uri) == shown


def test_already_fetched_needs_the_same_uri_and_a_model(tmp_path: Path) -> None:
    assert not already_fetched(tmp_path, "models:/a/1")
    (tmp_path / ".phi3-fetched.json").write_text('{"model_uri": "models:/a/1"}')
    assert not already_fetched(tmp_path, "models:/a/1")
    (tmp_path / "MLmodel").write_text("flavors: {}")
    assert already_fetched(tmp_path, "models:/a/1")
    assert not already_fetched(tmp_path, "models:/a/2")
