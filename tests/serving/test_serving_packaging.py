"""`phi3-operator package` and `fetch` against a real MLflow server, and the logged pyfuncs themselves."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tests.serving.conftest import ALIAS, REGISTERED_NAMES
from tests.support.mlflow_server import MlflowServer, free_port
from tests.support.serving import OFFLINE_ENV, run_cli
from tests.support.tiny_model import TinyModel

pytestmark = pytest.mark.serving

CHAT = [{"role": "user", "content": "Say hello."}]


def test_package_registers_aliases_and_records_what_the_operator_reads(
    packaged: dict[str, str], mlflow_server: MlflowServer
) -> None:
    client = MlflowClient(mlflow_server.tracking_uri)
    for flavor, uri in packaged.items():
        name = REGISTERED_NAMES[flavor]
        assert uri.startswith(f"models:/{name}/")
        version = uri.rsplit("/", 1)[1]
        assert client.get_model_version_by_alias(name, ALIAS).version == version
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    onnx_info = mlflow.models.get_model_info(packaged["onnx"])
    assert onnx_info.metadata == {
        "task": "llm/v1/chat",
        "phi3_flavor": "onnx-genai",
        "phi3_onnx_variants": ["cpu-int4", "cpu-fp32"],
        "phi3_context_length": 1024,
    }
    hf_info = mlflow.models.get_model_info(packaged["transformers"])
    assert hf_info.metadata == {"task": "llm/v1/chat", "phi3_flavor": "transformers"}
    assert "transformers" in hf_info.flavors


def test_package_errors_are_one_clear_line(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (
            ["package", "onnx", str(empty), "--name", "x", "--tracking-uri", mlflow_server.tracking_uri],
            "not an ONNX GenAI model folder",
        ),
        (
            ["package", "onnx", str(empty / "missing"), "--name", "x", "--tracking-uri", mlflow_server.tracking_uri],
            "not a directory",
        ),
        (
            ["package", "transformers", str(empty), "--name", "x", "--tracking-uri", mlflow_server.tracking_uri],
            "no config.json",
        ),
    ]
    variant_without_config = tmp_path / "variants" / "cpu-int4"
    variant_without_config.mkdir(parents=True)
    cases.append(
        (
            [
                "package",
                "onnx",
                str(variant_without_config.parent),
                "--name",
                "x",
                "--tracking-uri",
                mlflow_server.tracking_uri,
            ],
            "genai_config.json",
        )
    )
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_package_with_mlflow_unreachable(tiny_model: TinyModel) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_cli("package", "onnx", str(tiny_model.onnx_dir), "--name", "x", "--tracking-uri", dead, timeout=120)
    assert result.returncode == 2
    assert f"MLflow at {dead} is unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_fetch_is_idempotent_and_keeps_credentials_out_of_its_output(
    packaged: dict[str, str], mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    secret = "s3cr3t-token-value"
    env = {"MLFLOW_TRACKING_URI": mlflow_server.tracking_uri, "MLFLOW_TRACKING_TOKEN": secret}
    dest = tmp_path / "models" / "model"
    first = run_cli("fetch", "--model-uri", packaged["onnx"], "--dest", str(dest), env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("fetched:")
    assert (dest / "MLmodel").is_file()
    assert sorted(path.name for path in (dest / "artifacts" / "onnx").iterdir()) == ["cpu-fp32", "cpu-int4"]
    second = run_cli("fetch", "--model-uri", packaged["onnx"], "--dest", str(dest), env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("already present:")
    for output in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert secret not in output


def test_fetch_of_a_missing_version_fails_clearly(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    result = run_cli(
        "fetch",
        "--model-uri",
        "models:/no-such-model/3",
        "--dest",
        str(tmp_path / "m"),
        env={"MLFLOW_TRACKING_URI": mlflow_server.tracking_uri},
    )
    assert result.returncode == 2
    assert "cannot fetch models:/no-such-model/3" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def registry(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    return mlflow_server.tracking_uri


@pytest.mark.parametrize("variant", ["cpu-int4", "cpu-fp32"])
def test_onnx_pyfunc_predict_and_predict_stream(
    packaged: dict[str, str], registry: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHI3_ONNX_VARIANT", variant)
    model = mlflow.pyfunc.load_model(packaged["onnx"])
    assert model.unwrap_python_model().engine.model_id == f"onnx-genai/{variant}"

    answers = model.predict({"messages": CHAT, "max_tokens": 5})
    assert len(answers) == 1
    assert answers[0]["object"] == "chat.completion"
    assert answers[0]["usage"]["completion_tokens"] <= 5

    batch = model.predict([{"prompt": "Once upon"}, {"messages": CHAT}], params={"max_tokens": 3})
    assert [answer["usage"]["completion_tokens"] <= 3 for answer in batch] == [True, True]

    chunks = list(model.predict_stream({"messages": CHAT, "max_tokens": 12, "temperature": 0}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len(chunks) > 2

    with pytest.raises(ValueError, match="must not be empty"):
        model.predict({"messages": []})


def test_transformers_pyfunc_is_mlflows_own(packaged: dict[str, str], registry: str) -> None:
    """The transformers model is a plain MLflow llm/v1/chat model: MLflow's own pyfunc answers it too."""
    model = mlflow.pyfunc.load_model(packaged["transformers"])
    assert model.metadata.metadata["task"] == "llm/v1/chat"
    answers = model.predict({"messages": CHAT, "max_tokens": 5})
    assert answers[0]["object"] == "chat.completion"
    assert answers[0]["usage"]["completion_tokens"] <= 5


def serve_until_exit(model_uri: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    ports = [str(free_port()) for _ in range(3)]
    result = run_cli(
        "serve", "--model-uri", model_uri, "--model-name", "broken", "--host", "127.0.0.1",
        "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
        env=env, timeout=180,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def test_serve_exits_non_zero_when_the_model_cannot_load(tmp_path: Path) -> None:
    code, output = serve_until_exit(str(tmp_path / "no-model-here"))
    assert code == 1
    assert "the model failed to load: broken: " in output


def test_serve_names_a_missing_onnx_variant(packaged: dict[str, str], mlflow_server: MlflowServer) -> None:
    code, output = serve_until_exit(
        packaged["onnx"], env={"MLFLOW_TRACKING_URI": mlflow_server.tracking_uri, "PHI3_ONNX_VARIANT": "cuda-fp16"}
    )
    assert code == 1
    assert "no ONNX variant 'cuda-fp16'; it has: cpu-int4, cpu-fp32" in output
