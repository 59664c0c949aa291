"""A 429 from API Priority and Fairness is waited out (Retry-After, bounded) and retried inside the client,
as client-go does; other errors are raised at once."""

from __future__ import annotations

import json
from typing import Any

import pytest

from phi3_operator import k8s
from phi3_operator.k8s import KubeApi, KubeError, retry_after_s


class Response:
    def __init__(self, status: int, body: dict[str, Any], retry_after: str | None = None) -> None:
        self.status, self.reason, self._body, self._retry_after = status, "Too Many Requests", body, retry_after

    def read(self) -> bytes:
        return json.dumps(self._body).encode()

    def getheader(self, name: str) -> str | None:
        return self._retry_after if name == "Retry-After" else None


class ScriptedClient:
    """Stands in for the HTTP transport only: answers the requests in turn."""

    def __init__(self, *responses: Response) -> None:
        self.responses, self.calls = list(responses), 0

    def param_serialize(self, **kwargs: Any) -> tuple[str, str, dict[str, str], Any, None]:
        return kwargs["method"], kwargs["resource_path"], {}, kwargs.get("body"), None

    def call_api(self, *args: Any, **kwargs: Any) -> Response:
        self.calls += 1
        return self.responses.pop(0)


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(k8s.time, "sleep", slept.append)
    return slept


def test_a_throttled_request_waits_and_succeeds(no_sleep: list[float]) -> None:
    client = ScriptedClient(Response(429, {}, "2"), Response(429, {}, None), Response(200, {"ok": True}))
    assert KubeApi(client)._call("GET", "/x") == {"ok": True}  # type: ignore[arg-type]
    assert client.calls == 3 and no_sleep == [2.0, 1.0]


def test_throttling_that_does_not_end_is_an_error_after_a_few_tries() -> None:
    client = ScriptedClient(*[Response(429, {"message": "too many requests"}, "1")] * 4)
    with pytest.raises(KubeError) as raised:
        KubeApi(client)._call("PATCH", "/x", body={})  # type: ignore[arg-type]
    assert raised.value.status == 429 and client.calls == 4


def test_other_errors_are_not_retried() -> None:
    client = ScriptedClient(Response(500, {"message": "boom"}))
    with pytest.raises(KubeError):
        KubeApi(client)._call("GET", "/x")  # type: ignore[arg-type]
    assert client.calls == 1


@pytest.mark.parametrize(("header", "wait"), [(None, 1.0), ("0", 0.1), ("3", 3.0), ("120", 5.0), ("soon", 1.0)])
def test_retry_after_is_bounded(header: str | None, wait: float) -> None:
    assert retry_after_s(header) == wait
