"""Elastic serving on the real node: Knative Serving v0.50 (built from its modules, `hack/localcluster
knative up`) scales a model on requests in flight, to and from zero; its activator holds what arrives at
zero until a pod is Ready. Clients are the openai SDK, calling the Revision's Service (status.endpoint)
through kube-proxy from the host, with the headers that name the Revision (no cluster DNS on the host).

Each test prints what it measured (`ELASTIC {...}`): the closing notes quote them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import openai
import pytest
from tests.support.cluster import REPO_ROOT, Cluster
from tests.support.realnode import RealPath, diagnose
from tests.support.wait import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LOCALCLUSTER = str(REPO_ROOT / "hack" / "localcluster")
KNATIVE_NAMESPACE = "knative-serving"
# The test cluster's autoscaler decides on 6 s of history (Knative's least) rather than 60 s, and drops
# an idle Revision's last pod 6 s after it chose zero: the tests wait seconds, not minutes.
TEST_AUTOSCALER = {"stable-window": "6s", "scale-to-zero-grace-period": "6s"}
PROMPT = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


@dataclass
class Elastic:
    real_path: RealPath

    @property
    def cluster(self) -> Cluster:
        return self.real_path.cluster

    @property
    def namespace(self) -> str:
        return self.real_path.namespace

    def apply(self, name: str, **autoscaling: Any) -> None:
        uri = self.real_path.package(name)
        self.cluster.apply(self.real_path.manifest(name, uri, autoscaling=autoscaling), self.namespace)

    def model(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.cluster.get("phi3", name, self.namespace)
        return result

    def available(self, name: str) -> dict[str, Any]:
        obj = self.model(name)
        return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Available"), {})

    def wait_reason(self, name: str, reason: str, timeout: float = 420) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            obj = self.model(name)
            fresh = obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]
            return obj if fresh and self.available(name).get("reason") == reason else None

        try:
            result: dict[str, Any] = wait_until(reached, timeout=timeout, interval=1, message=f"{name}: {reason}")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{diagnose(self.cluster, self.namespace, self.real_path.operator)}"
                                 ) from None
        return result

    def revision(self, name: str) -> str:
        url = str(self.model(name)["status"]["endpoint"]["url"])
        return url.removeprefix("http://").split(".", 1)[0]

    def client(self, name: str) -> openai.OpenAI:
        """The openai SDK at the Revision's Service (status.endpoint), as a pod calls it: through kube-proxy."""
        revision = self.revision(name)
        service = self.cluster.get("service", revision, self.namespace)
        port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
        headers = {"Knative-Serving-Revision": revision, "Knative-Serving-Namespace": self.namespace}
        return openai.OpenAI(base_url=f"http://{service['spec']['clusterIP']}:{port}/v1", api_key="unused",
                             default_headers=headers, max_retries=0, timeout=600)

    def pods(self, name: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.cluster.get("pods", namespace=self.namespace)["items"]
        return [p for p in items if p["metadata"].get("labels", {}).get("phi3.ai/model") == name]

    def running_pods(self, name: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(name) if not p["metadata"].get("deletionTimestamp")]


@dataclass
class StreamResult:
    started: float
    first_token: float | None = None
    finished: float | None = None
    tokens: int = 0
    chunks: int = 0
    finish_reason: str | None = None
    error: str = ""

    @property
    def ttft(self) -> float:
        assert self.first_token is not None
        return self.first_token - self.started


def stream(client: openai.OpenAI, model: str, max_tokens: int = 16) -> StreamResult:
    result = StreamResult(started=time.monotonic())
    try:
        # ignore_eos: exactly max_tokens each time (the tiny model's random weights may stop at once).
        chunks = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, stream=True,
                                                extra_body={"ignore_eos": True})
        for chunk in chunks:
            result.chunks += 1
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            # The first generated output: text, or the end (the random model's 16 tokens may all decode to
            # nothing visible, special tokens, and then only the final chunk carries news).
            if result.first_token is None and (choice.delta.content or choice.finish_reason):
                result.first_token = time.monotonic()
            result.tokens += bool(choice.delta.content)
            result.finish_reason = choice.finish_reason or result.finish_reason
        result.finished = time.monotonic()
        # Complete: it said why it ended (a stream cut short by a proxy ends without it).
        if result.finish_reason is None or result.first_token is None:
            result.error = (f"incomplete stream: {result.chunks} chunks, {result.tokens} with text, finish_reason "
                            f"{result.finish_reason}, ended {result.finished - result.started:.2f}s after it began")
    except Exception as error:  # counted, and the test fails on any
        result.error = f"{type(error).__name__}: {error}"
    return result


def concurrent_streams(client: openai.OpenAI, model: str, count: int) -> list[StreamResult]:
    results: list[StreamResult] = []
    lock = threading.Lock()

    def one() -> None:
        outcome = stream(client, model)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=700)
    return results


@dataclass
class Load:
    """`clients` threads streaming back to back until stopped; each result keeps its start time."""

    client: openai.OpenAI
    model: str
    clients: int
    results: list[StreamResult] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, clients: int | None = None) -> None:
        for _ in range(clients or self.clients):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self) -> None:
        while not self._stop.is_set():
            outcome = stream(self.client, self.model)
            with self._lock:
                self.results.append(outcome)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=700)

    def failures(self) -> list[str]:
        return [r.error for r in self.results if r.error]


def pod_start_to_ready_s(pod: dict[str, Any]) -> float:
    created = _time(pod["metadata"]["creationTimestamp"])
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready" and c["status"] == "True")
    return _time(ready["lastTransitionTime"]) - created


def _time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(**figures: Any) -> None:
    print("ELASTIC " + json.dumps(figures, default=lambda v: round(v, 3) if isinstance(v, float) else str(v)))


@pytest.fixture(scope="module")
def elastic(real_path: RealPath) -> Iterator[Elastic]:
    up = subprocess.run([LOCALCLUSTER, "knative", "up"], capture_output=True, text=True, timeout=2400)
    assert up.returncode == 0, f"{up.stdout[-2000:]}\n{up.stderr[-4000:]}"
    print(up.stderr.strip().splitlines()[-1] if up.stderr.strip() else "knative up")
    real_path.cluster.kubectl("patch", "configmap", "config-autoscaler", "-n", KNATIVE_NAMESPACE, "--type=merge",
                              "-p", json.dumps({"data": TEST_AUTOSCALER}))
    try:
        yield Elastic(real_path)
    finally:
        # Models first: a Revision outlives Knative's controller otherwise, with its pods.
        real_path.cluster.kubectl("delete", "phi3", "--all", "-n", real_path.namespace, "--wait=true",
                                  "--timeout=120s", check=False)
        subprocess.run([LOCALCLUSTER, "knative", "down"], capture_output=True, text=True, timeout=600)


def wait_zero_pods(elastic: Elastic, name: str, timeout: float = 240) -> float:
    """Seconds until the model has no pod left (its Revision scaled to zero)."""
    started = time.monotonic()
    wait_until(lambda: not elastic.pods(name), timeout=timeout, interval=1, message=f"{name} to scale to zero")
    return time.monotonic() - started


def test_a_model_at_zero_answers_eight_concurrent_streams(elastic: Elastic) -> None:
    name = "elastic-zero"
    elastic.apply(name, minReplicas=0, maxReplicas=1, scaleDownDelaySeconds=0)
    obj = elastic.wait_reason(name, "ScaledToZero")
    assert obj["status"]["idleSince"] and obj["status"]["phase"] == "Ready"
    assert obj["status"]["readyReplicasText"] == "0/0"
    wait_zero_pods(elastic, name)  # the last pod drains (the queue proxy waits for its endpoints to go)
    elastic_condition = next(c for c in obj["status"]["conditions"] if c["type"] == "ElasticServing")
    assert elastic_condition["reason"] == "Knative", elastic_condition
    url = obj["status"]["endpoint"]["url"]

    # The pod's own start-to-Ready, read while it is Ready: idle again, it soon goes.
    ready_pods: list[dict[str, Any]] = []
    watcher = threading.Thread(target=lambda: ready_pods.append(wait_until(
        lambda: next((p for p in elastic.pods(name) if _ready(p)), None), timeout=300, interval=0.5,
        message="the woken pod to be Ready")))
    watcher.start()
    results = concurrent_streams(elastic.client(name), name, 8)
    watcher.join(timeout=300)
    failures = [r.error for r in results if r.error]
    assert len(results) == 8 and failures == [], failures
    assert len(ready_pods) == 1 and len({p["metadata"]["name"] for p in elastic.pods(name)}) <= 1
    start_to_ready = pod_start_to_ready_s(ready_pods[0])
    ttfts = [r.ttft for r in results]
    report(test="from_zero_8_streams", ttft_min=min(ttfts), ttft_max=max(ttfts), pod_start_to_ready=start_to_ready)
    # The URL does not move with the scale.
    assert elastic.model(name)["status"]["endpoint"]["url"] == url


def test_idle_returns_to_zero_and_a_request_wakes_it_three_times(elastic: Elastic) -> None:
    name = "elastic-zero"  # the model of the test above: it has just served
    cycles = []
    for _ in range(3):
        to_zero = wait_zero_pods(elastic, name)
        elastic.wait_reason(name, "ScaledToZero", timeout=120)
        woke = stream(elastic.client(name), name)
        assert not woke.error, woke.error
        cycles.append({"to_zero_s": to_zero, "ttft_from_zero_s": woke.ttft})
    report(test="three_cycles", cycles=cycles)


def test_load_scales_out_and_a_scale_down_loses_no_stream(elastic: Elastic) -> None:
    name = "elastic-load"
    # Two requests per pod: 16 clients want 3 pods (maxReplicas); the delay keeps a load that dips for a
    # moment from removing a pod it will need again a second later.
    elastic.apply(name, minReplicas=1, maxReplicas=3, targetRequestsPerReplica=2, scaleDownDelaySeconds=30)
    elastic.wait_reason(name, "MinimumReplicasAvailable")
    client = elastic.client(name)
    before = [r.ttft for r in concurrent_streams(client, name, 1) + concurrent_streams(client, name, 1)]

    load = Load(client, name, clients=16)
    started = time.monotonic()
    load.start()
    wait_until(lambda: len([p for p in elastic.running_pods(name) if _ready(p)]) > 1, timeout=180, interval=1,
               message="a second ready pod under load")
    scaled_after = time.monotonic() - started
    time.sleep(max(0.0, 120 - (time.monotonic() - started)))
    peak = len(elastic.running_pods(name))
    under_load = [r for r in load.results if r.started > started + scaled_after and not r.error]
    # One pod, 16 clients: the streams that began before a second pod was Ready.
    before_scale = [r.ttft for r in load.results if r.started <= started + scaled_after and not r.error]

    # Fewer clients: Knative removes pods while streams run on them; none may fail.
    load._stop.set()
    for thread in load._threads:
        thread.join(timeout=700)
    tail = Load(client, name, clients=2)
    tail.start()
    removed_started = time.monotonic()
    wait_until(lambda: len(elastic.running_pods(name)) <= 1 and len(elastic.pods(name)) <= 1, timeout=300,
               interval=1, message="the scale-down to one pod")
    removed_after = time.monotonic() - removed_started
    tail.stop()

    failures = [f"under load at +{r.started - started:.1f}s: {r.error}" for r in load.results if r.error]
    failures += [f"during the scale-down at +{r.started - removed_started:.1f}s: {r.error}"
                 for r in tail.results if r.error]
    after = [r.ttft for r in under_load]
    report(test="load_16_clients_120s", scaled_above_one_after_s=scaled_after, peak_pods=peak,
           ttft_idle_p50=statistics.median(before),
           ttft_before_scale_p50=percentile(before_scale, 0.5), ttft_before_scale_p99=percentile(before_scale, 0.99),
           ttft_after_scale_p50=percentile(after, 0.5), ttft_after_scale_p99=percentile(after, 0.99),
           streams=len(load.results) + len(tail.results), failed=len(failures),
           scale_down_to_one_s=removed_after, streams_during_scale_down=len(tail.results))
    assert failures == [], failures[:5]
    assert peak > 1 and after and before_scale


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def test_the_scaler_and_the_operator_killed_during_a_wake_lose_no_request(elastic: Elastic) -> None:
    name = "elastic-zero"
    wait_zero_pods(elastic, name)
    elastic.wait_reason(name, "ScaledToZero", timeout=120)
    client = elastic.client(name)
    results: list[StreamResult] = []
    threads = [threading.Thread(target=lambda: results.append(stream(client, name))) for _ in range(4)]
    for thread in threads:
        thread.start()
    # While the requests are held: Knative's autoscaler and controller pods, and the operator, die.
    wait_until(lambda: elastic.pods(name), timeout=60, interval=0.2, message="the wake to start a pod")
    elastic.cluster.kubectl("delete", "pod", "-n", KNATIVE_NAMESPACE, "-l", "app in (autoscaler,controller)",
                            "--grace-period=0", "--force", "--wait=false")
    operator = elastic.real_path.operator
    operator.stop(sig=9)
    operator.start()
    for thread in threads:
        thread.join(timeout=700)
    failures = [r.error for r in results if r.error]
    report(test="faults_during_wake", answered=len(results) - len(failures), of=4,
           ttft_max=max((r.ttft for r in results if not r.error), default=0.0))
    assert len(results) == 4 and failures == [], failures


def test_a_request_held_past_the_activation_timeout_is_answered_not_left_hanging(elastic: Elastic) -> None:
    """No pod can come up (the node is cordoned): the activator answers the held request once
    activationTimeoutSeconds have passed. Knative answers 504 Gateway Timeout ("activator request
    timeout"); it has no setting for a 503 with Retry-After."""
    name = "elastic-timeout"
    elastic.apply(name, minReplicas=0, maxReplicas=1, scaleDownDelaySeconds=0, activationTimeoutSeconds=10)
    elastic.wait_reason(name, "ScaledToZero")
    wait_zero_pods(elastic, name)
    cluster = elastic.cluster
    node = "phi3-node-0"
    cluster.kubectl("cordon", node)
    try:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as raised:
            elastic.client(name).chat.completions.create(model=name, messages=PROMPT, max_tokens=4)
        waited = time.monotonic() - started
    finally:
        cluster.kubectl("uncordon", node)
    report(test="activation_timeout", status=raised.value.status_code, waited_s=waited,
           body=raised.value.response.text[:200])
    assert raised.value.status_code == 504 and "activator request timeout" in raised.value.response.text
    assert 10 <= waited < 60
    # Once a pod can come up, the next request is answered.
    woke = stream(elastic.client(name), name)
    assert not woke.error, woke.error
