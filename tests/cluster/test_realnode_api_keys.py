"""spec.auth on the real node: the runtime takes only the keys in the model's Secret, and a change of
the Secret (the kubelet updates the mounted volume) applies without a restart. No key appears in the
pod's log, the operator's log, an Event or the status. A Secret that is missing holds the rollout with
ApiKeysUnavailable.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest
from tests.support.realnode import RealPath, diagnose, ready_model, service_base_url, serving_pods
from tests.support.wait import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "keyed-model"
SECRET = "keyed-model-keys"


def _secret(keys: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "type": "Opaque",
            "stringData": keys}


def _answers(base_url: str, key: str | None) -> bool:
    """True on an answer, False on a 401; anything else fails the test. No key: a plain request without
    an Authorization header (the SDK insists on one)."""
    if key is None:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
        request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=60).close()
        except urllib.error.HTTPError as error:
            assert error.code == 401 and error.headers["WWW-Authenticate"] == "Bearer", error
            return False
        return True
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    except openai.AuthenticationError:
        return False
    return True


def _condition(real_path: RealPath, name: str, kind: str) -> dict[str, Any]:
    obj = real_path.cluster.get("phi3", name, real_path.namespace)
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def test_api_keys_from_the_secret_guard_the_model_and_rotate_without_a_restart(real_path: RealPath) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    key_a, key_b = f"sk-a-{secrets.token_hex(16)}", f"sk-b-{secrets.token_hex(16)}"
    cluster.apply(_secret({"a": key_a}), namespace)
    uri = real_path.package(MODEL)
    cluster.apply(real_path.manifest(MODEL, uri, auth={"apiKeySecretRef": {"name": SECRET}}), namespace)
    missing = real_path.manifest("keyless-model", uri, auth={"apiKeySecretRef": {"name": "no-such-secret"}})
    cluster.apply(missing, namespace)
    try:
        obj = wait_until(lambda: ready_model(cluster, MODEL, namespace), timeout=420, interval=2,
                         message=f"{MODEL} to be Ready")
        held = wait_until(lambda: (c := _condition(real_path, "keyless-model", "Available")).get("reason")
                          == "ApiKeysUnavailable" and c, timeout=120, interval=2,
                          message="the model with a missing Secret to report ApiKeysUnavailable")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(cluster, namespace, real_path.operator)}") from None
    assert "no-such-secret" in held["message"]
    assert cluster.kubectl("get", "deployment", "keyless-model", "-n", namespace, check=False).returncode != 0
    assert obj["status"]["endpoint"]["authorization"] == f"Bearer: a key from Secret {namespace}/{SECRET}"

    base = service_base_url(cluster, MODEL, namespace)
    assert _answers(base, key_a)
    assert not _answers(base, None) and not _answers(base, key_b)
    (pod_before,) = [p["metadata"]["uid"] for p in serving_pods(cluster, MODEL, namespace)]

    # Rotation: add B, then remove A. The kubelet rewrites the mounted Secret; the runtime rereads it.
    started = time.monotonic()
    cluster.apply(_secret({"a": key_a, "b": key_b}), namespace)
    wait_until(lambda: _answers(base, key_b), timeout=240, interval=1, message="key B to be accepted")
    added_s = time.monotonic() - started
    assert _answers(base, key_a)
    started = time.monotonic()
    cluster.kubectl("patch", "secret", SECRET, "-n", namespace, "--type=json",
                    "-p", json.dumps([{"op": "remove", "path": "/data/a"}]))
    wait_until(lambda: not _answers(base, key_a), timeout=240, interval=1, message="key A to be refused")
    removed_s = time.monotonic() - started
    assert _answers(base, key_b)
    print(f"API key rotation through the Secret: added key accepted after {added_s:.1f}s, "
          f"removed key refused after {removed_s:.1f}s")
    assert [p["metadata"]["uid"] for p in serving_pods(cluster, MODEL, namespace)] == [pod_before], "no restart"

    # No key anywhere a person or a log collector reads.
    (pod,) = serving_pods(cluster, MODEL, namespace)
    readable = "\n".join([
        cluster.kubectl("logs", pod["metadata"]["name"], "-n", namespace, "--all-containers").stdout,
        real_path.operator.log(),
        cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout,
        json.dumps(cluster.get("phi3", MODEL, namespace)["status"]),
        json.dumps(cluster.get("deployment", MODEL, namespace)),
    ])
    assert key_a not in readable and key_b not in readable
    for name in (MODEL, "keyless-model"):
        cluster.kubectl("delete", "phi3", name, "-n", namespace, "--wait=false", check=False)
