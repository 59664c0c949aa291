"""LLM serving metrics, exported on the runtime's metrics port (Prometheus).

MLServer with `parallel_workers: 0` serves prometheus_client's default registry on its metrics
port, so registering there is all it takes. The names follow the vLLM / TGI conventions that
autoscalers (KEDA, prometheus-adapter, the Gateway API inference extension) key on: a gauge of
requests running, one of requests waiting, token counters, and latency histograms. Every series
carries a `model` label, the served model's name.

Engines report through `ModelMetrics`; they decide what "running" means. For the batching engine
it is the engine's own view (a turn counts until og.Engine reports it finished or cancelled),
which is what makes a cancelled stream visibly stop costing compute.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

# Seconds: first tokens of small models arrive in milliseconds, large ones or queued in seconds.
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class _Families:
    running: Gauge
    waiting: Gauge
    max_batch: Gauge
    occupancy: Gauge
    batch_size: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    requests: Counter
    ttft: Histogram
    itl: Histogram


_lock = threading.Lock()
_families: list[_Families] = []  # at most one: prometheus_client refuses a name registered twice


def _registered() -> _Families:
    """The metric families, registered once per process (tests and the bench load several engines)."""
    with _lock:
        if not _families:
            _families.append(_Families(
                running=Gauge("phi3_requests_running", "Requests being decoded now.", ["model"]),
                waiting=Gauge(
                    "phi3_requests_waiting", "Requests accepted and waiting for their first token.", ["model"]
                ),
                max_batch=Gauge(
                    "phi3_batch_size_max", "The most sequences the engine decodes in one step.", ["model"]
                ),
                occupancy=Gauge(
                    "phi3_batch_occupancy_ratio", "Sequences in the last decode step over the maximum batch size.",
                    ["model"],
                ),
                batch_size=Histogram(
                    "phi3_batch_size", "Sequences decoded per engine step.", ["model"], buckets=_BATCH_BUCKETS
                ),
                prompt_tokens=Counter("phi3_prompt_tokens", "Prompt tokens processed.", ["model"]),
                generation_tokens=Counter("phi3_generation_tokens", "Tokens generated.", ["model"]),
                requests=Counter(
                    "phi3_requests_finished", "Requests finished, by finish reason.", ["model", "finish_reason"]
                ),
                ttft=Histogram(
                    "phi3_time_to_first_token_seconds", "From accepting a request to its first generated token.",
                    ["model"], buckets=_TTFT_BUCKETS,
                ),
                itl=Histogram(
                    "phi3_inter_token_latency_seconds", "Between consecutive generated tokens of one request.",
                    ["model"], buckets=_ITL_BUCKETS,
                ),
            ))
        return _families[0]


class ModelMetrics:
    """The metric series of one served model; thread-safe (prometheus_client locks each value)."""

    def __init__(self, model: str, max_batch_size: int | None = None) -> None:
        families = _registered()
        self.model = model
        self.running = families.running.labels(model)
        self.waiting = families.waiting.labels(model)
        self._occupancy = families.occupancy.labels(model)
        self._batch_size = families.batch_size.labels(model)
        self._prompt_tokens = families.prompt_tokens.labels(model)
        self._generation_tokens = families.generation_tokens.labels(model)
        self._requests = families.requests
        self._ttft = families.ttft.labels(model)
        self._itl = families.itl.labels(model)
        self._max_batch = max_batch_size
        if max_batch_size:
            families.max_batch.labels(model).set(max_batch_size)

    def accepted(self, prompt_tokens: int) -> None:
        self.waiting.inc()
        self._prompt_tokens.inc(prompt_tokens)

    def first_token(self, seconds: float) -> None:
        self.waiting.dec()
        self.running.inc()
        self._ttft.observe(seconds)

    def token(self, since_previous: float | None) -> None:
        self._generation_tokens.inc()
        if since_previous is not None:
            self._itl.observe(since_previous)

    def finished(self, finish_reason: str, *, started: bool) -> None:
        (self.running if started else self.waiting).dec()
        self._requests.labels(self.model, finish_reason).inc()

    def idle(self) -> None:
        self._occupancy.set(0)

    def step(self, sequences: int) -> None:
        """One engine step decoded `sequences` sequences together."""
        self._batch_size.observe(sequences)
        if self._max_batch:
            self._occupancy.set(sequences / self._max_batch)

    def set_max_batch(self, max_batch_size: int) -> None:
        self._max_batch = max_batch_size
        _registered().max_batch.labels(self.model).set(max_batch_size)


class RequestMeter:
    """One request's path through the metrics: waiting, then running, then finished.

    Engines call it where their compute happens, so the gauges show the engine's own state. It
    does nothing without metrics (a model used as a plain pyfunc).
    """

    __slots__ = ("_accepted_at", "_done", "_last_token_at", "_metrics")

    def __init__(self, metrics: ModelMetrics | None, prompt_tokens: int) -> None:
        self._metrics = metrics
        self._accepted_at = time.perf_counter()
        self._last_token_at: float | None = None
        self._done = False
        if metrics is not None:
            metrics.accepted(prompt_tokens)

    @property
    def started(self) -> bool:
        return self._last_token_at is not None

    def token(self) -> None:
        if self._metrics is None:
            self._last_token_at = 0.0
            return
        now = time.perf_counter()
        if self._last_token_at is None:
            self._metrics.first_token(now - self._accepted_at)
            self._metrics.token(None)
        else:
            self._metrics.token(now - self._last_token_at)
        self._last_token_at = now

    def finish(self, finish_reason: str) -> None:
        if self._metrics is None or self._done:
            return
        self._done = True
        self._metrics.finished(finish_reason, started=self._last_token_at is not None)
