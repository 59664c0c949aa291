"""API keys from a mounted Secret, against a real `serve`: who gets in, what stays open, and rotation.

The key directory is laid out and updated the way the kubelet does it (tests/support/secret_volume).
Rotation delays are printed: run with `-s` to see them.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from phi3_serving.guard import KEYS_RECHECK_S
from tests.serving.conftest import onnx_process
from tests.support.raw_http import Reply, send
from tests.support.secret_volume import write_secret_volume
from tests.support.serving import ServedProcess
from tests.support.wait import wait_until

pytestmark = pytest.mark.serving

KEY_A = f"sk-test-a-{secrets.token_urlsafe(24)}"
KEY_B = f"sk-test-b-{secrets.token_urlsafe(24)}"
WRONG = f"sk-test-wrong-{secrets.token_urlsafe(24)}"
CHAT = [{"role": "user", "content": "Say hello."}]
JSON = {"Content-Type": "application/json"}
# A rotation applies at the first request after the next look at the directory (every KEYS_RECHECK_S).
ROTATION_BOUND_S = 2 * KEYS_RECHECK_S


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("secret") / "api-keys"
    write_secret_volume(root, {"team-a": f"{KEY_A}\n"})
    return root


@pytest.fixture(scope="module")
def keyed(onnx_model_dir: Path, keys_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    workdir = tmp_path_factory.mktemp("api-keys")
    with onnx_process(onnx_model_dir, "tiny-keyed", workdir, {"PHI3_API_KEYS_DIR": str(keys_dir)}) as process:
        yield process


def bearer(key: str | None) -> dict[str, str]:
    return {**JSON, **({"Authorization": f"Bearer {key}"} if key is not None else {})}


def chat_body(**extra: object) -> bytes:
    return json.dumps({"messages": CHAT, "max_tokens": 2, **extra}).encode()


def call(process: ServedProcess, key: str | None, method: str = "POST", path: str = "/v1/chat/completions",
         body: bytes | None = None) -> Reply:
    return send(process.http_port, method, path, chat_body() if body is None and method == "POST" else body,
                bearer(key))


def model_paths(process: ServedProcess) -> list[tuple[str, str, bytes | None]]:
    name = process.model_name
    v2 = json.dumps({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["Hi"]}],
                     "parameters": {"max_tokens": 2}}).encode()
    return [
        ("POST", "/v1/chat/completions", chat_body()),
        ("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()),
        ("POST", "/v1/responses", json.dumps({"input": "Hi"}).encode()),
        ("GET", "/v1/models", None),
        ("POST", f"/v2/models/{name}/infer", v2),
        ("POST", f"/v2/models/{name}/versions/1/infer", v2),
        ("POST", f"/v2/models/{name}/infer_stream", v2),
        ("GET", f"/v2/models/{name}", None),
        ("GET", "/v2", None),
        ("GET", "/v2/docs", None),
        ("POST", "/v2/repository/index", b"{}"),
        ("POST", f"/v2/repository/models/{name}/unload", b""),
        ("POST", "/invocations", json.dumps({"dataframe_records": [{"prompt": "Hi", "max_tokens": 2}]}).encode()),
        ("GET", "/no/such/path", None),
    ]


def assert_refused(reply: Reply, presented: str | None) -> None:
    assert reply.status == 401, (reply.status, reply.body[:200])
    assert reply.headers["www-authenticate"] == "Bearer"
    assert reply.json() == {
        "error": {"message": reply.json()["error"]["message"], "type": "invalid_request_error", "param": None,
                  "code": "invalid_api_key"},
    }
    if presented:
        assert presented.encode() not in reply.body


def test_every_model_path_needs_a_valid_key(keyed: ServedProcess) -> None:
    for method, path, body in model_paths(keyed):
        for key in (None, WRONG, KEY_A.upper(), KEY_A[:-1], f"{KEY_A}x"):
            assert_refused(send(keyed.http_port, method, path, body, bearer(key)), key)
        # Not a Bearer token, or the key without its scheme.
        assert_refused(send(keyed.http_port, method, path, body, {**JSON, "Authorization": f"Basic {KEY_A}"}), KEY_A)
        assert_refused(send(keyed.http_port, method, path, body, {**JSON, "Authorization": KEY_A}), KEY_A)


def test_the_key_opens_v2_and_invocations(keyed: ServedProcess) -> None:
    name = keyed.model_name
    _, _, v2 = model_paths(keyed)[4]
    reply = send(keyed.http_port, "POST", f"/v2/models/{name}/infer", v2, bearer(KEY_A))
    assert reply.status == 200, reply.body[:300]
    assert reply.json()["model_name"] == name
    reply = send(keyed.http_port, "POST", "/invocations",
                 json.dumps({"dataframe_records": [{"prompt": "Hi", "max_tokens": 2}]}).encode(), bearer(KEY_A))
    assert reply.status == 200, reply.body[:300]
    assert call(keyed, KEY_A, "GET", f"/v2/models/{name}").status == 200
    assert call(keyed, KEY_A, "GET", "/v1/models").json()["data"][0]["id"] == name


def test_the_openai_sdk_with_api_key(keyed: ServedProcess) -> None:
    client = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=KEY_A, max_retries=0, timeout=60)
    answer = client.chat.completions.create(model=keyed.model_name, messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    assert answer.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=keyed.model_name, messages=CHAT, max_tokens=4, stream=True))  # type: ignore[arg-type]
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    completion = client.completions.create(model=keyed.model_name, prompt="Once upon a time", max_tokens=4)
    assert completion.object == "text_completion"
    wrong = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=WRONG, max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.chat.completions.create(model=keyed.model_name, messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    assert refused.value.code == "invalid_api_key"
    assert WRONG not in str(refused.value)


def test_health_readiness_and_metrics_stay_open(keyed: ServedProcess) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{keyed.model_name}/ready", "/ping"):
        assert keyed.get(path)[0] == 200, path
    status, metrics = keyed.get("/metrics", port=keyed.metrics_port)
    assert status == 200 and b"phi3_requests_running" in metrics


def test_the_grpc_port_is_off_while_keys_are_required(keyed: ServedProcess) -> None:
    # It would take inference with no key check: MLServer's gRPC server has no place for one.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", keyed.grpc_port), timeout=2).close()
    assert "the gRPC port is off" in keyed.log_path.read_text()


def _applies_within(check: object, what: str) -> float:
    """Seconds from now until `check()` holds, polling every 20 ms."""
    assert callable(check)
    started = time.perf_counter()
    wait_until(check, timeout=10, interval=0.02, message=what)
    return time.perf_counter() - started


def test_rotation_applies_without_a_restart(keyed: ServedProcess, keys_dir: Path) -> None:
    assert call(keyed, KEY_A).status == 200
    assert call(keyed, KEY_B).status == 401
    # Step 1: the new key is added beside the old one.
    write_secret_volume(keys_dir, {"team-a": f"{KEY_A}\n", "team-b": f"  {KEY_B}  \n"})
    added = _applies_within(lambda: call(keyed, KEY_B).status == 200, "key B to be accepted")
    assert call(keyed, KEY_A).status == 200, "the old key must keep working until it is removed"
    # Step 2: the old key is removed.
    write_secret_volume(keys_dir, {"team-b": f"{KEY_B}\n"})
    removed = _applies_within(lambda: call(keyed, KEY_A).status == 401, "key A to be refused")
    assert call(keyed, KEY_B).status == 200
    print(f"\nrotation: key B accepted {added:.2f} s after the volume update, key A refused {removed:.2f} s after "
          f"its removal (the guard looks every {KEYS_RECHECK_S:.0f} s)")
    assert added <= ROTATION_BOUND_S and removed <= ROTATION_BOUND_S


def test_no_usable_key_fails_closed_and_says_so_once(keyed: ServedProcess, keys_dir: Path) -> None:
    write_secret_volume(keys_dir, {"team-b": "\n"})
    _applies_within(lambda: call(keyed, KEY_B).status == 401, "the emptied volume to refuse key B")
    for key in (None, "", KEY_A, KEY_B):
        assert call(keyed, key or None).status == 401
    assert keyed.get("/v2/health/ready")[0] == 200
    time.sleep(KEYS_RECHECK_S * 1.5)  # the guard looks again, and must not say it again
    assert call(keyed, KEY_B).status == 401
    log = keyed.log_path.read_text(errors="replace")
    assert log.count(f"the API key directory {keys_dir} holds no key") == 1, log[-2000:]
    write_secret_volume(keys_dir, {"team-b": f"{KEY_B}\n"})
    _applies_within(lambda: call(keyed, KEY_B).status == 200, "key B to be accepted again")


def test_no_key_reaches_the_log(keyed: ServedProcess) -> None:
    log = keyed.log_path.read_text(errors="replace")
    assert "API keys: 1 key(s) in" in log
    for key in (KEY_A, KEY_B, WRONG):
        assert key not in log
        assert key[len("sk-test-"):] not in log
