"""HTTP at the level the guard works at: declared lengths, chunked uploads, bodies never sent."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _reply(response: http.client.HTTPResponse) -> Reply:
    return Reply(response.status, {name.lower(): value for name, value in response.getheaders()}, response.read())


def send(
    port: int, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
    headers: Mapping[str, str] | None = None, *, timeout: float = 120,
) -> Reply:
    """One request on its own connection. An iterable body goes chunked (no Content-Length)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        connection.request(method, path, body=body, headers=dict(headers or {}), encode_chunked=chunked)
        return _reply(connection.getresponse())
    finally:
        connection.close()


def declare_only(port: int, path: str, length: int, headers: Mapping[str, str] | None = None) -> Reply:
    """Headers declaring a body of `length` bytes, and not one byte of it: the answer must not wait for it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("POST", path)
        declared = {"Content-Type": "application/json", **(headers or {}), "Content-Length": str(length)}
        for name, value in declared.items():
            connection.putheader(name, value)
        connection.endheaders()
        return _reply(connection.getresponse())
    finally:
        connection.close()


class KeptAlive:
    """Requests one after another on one connection, reconnecting when the server closed it."""

    def __init__(self, port: int, timeout: float = 120) -> None:
        self._port = port
        self._timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def send(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]) -> Reply:
        for attempt in range(2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self._timeout)
            try:
                self._connection.request(method, path, body=body, headers=dict(headers))
                reply = _reply(self._connection.getresponse())
            except (http.client.RemoteDisconnected, ConnectionError, http.client.CannotSendRequest):
                self.close()
                if attempt:
                    raise
                continue
            if reply.headers.get("connection", "").lower() == "close":
                self.close()
            return reply
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
