"""Batched generation on onnxruntime-genai's request engine (`og.Engine`).

One scheduler thread owns the engine: it admits turns, calls `engine.run()` and routes each token
event to its request's queue. The threads that serve requests only submit, read their queue and
decode, so the engine is never touched from two threads.

What the engine can and cannot do decides the design (onnxruntime-genai 0.18, verified):
- On CPU it batches statically: a turn that arrives while a batch runs waits until the whole batch
  is done. Dynamic (continuous) batching needs a paged-attention export, which the model builder
  makes only for CUDA and WebGPU. So on a static engine the scheduler holds arrivals itself and
  admits them together, with a short window after a batch ends in which the clients that just got
  their answers can send the next request and join the next batch, instead of one request starting
  a batch alone and the rest waiting for it (a ping-pong that never batches).
- Per-turn seeds and stop strings need dynamic batching. Stop strings are cut here, by the reader
  (which then cancels the turn); a seeded request takes the per-request `og.Generator` path, whose
  sampling is reproducible.
- A lone request can be faster on the per-request path. Whether it is, is measured while the engine
  is idle after the model loads (a few short generations, a round at a time, so that neither the
  pod's readiness nor a request waits for all of them; until then lone requests use the engine),
  and a request that finds the engine idle (and nobody about to come back) then runs on a
  Generator in its reader's own thread, with no hand-off per token. Seeded requests that arrive
  while the engine is busy run on Generators that the scheduler thread steps between engine steps.
- A reader that stops reading (the client went away, a stop string matched) cancels its turn; the
  engine reports the turn finished as CANCELLED and the running gauge drops at once.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from phi3_serving.chat import ChatRequest, Completion, GenerationDefaults, StopSequenceFilter
from phi3_serving.engine import CancellableStream, StreamEvent
from phi3_serving.metrics import ModelMetrics, RequestMeter
from phi3_serving.onnx_engine import OnnxEngineBase, PreparedOnnxRequest
from phi3_serving.variants import OnnxVariant

ENV_MAX_BATCH_SIZE = "PHI3_MAX_BATCH_SIZE"
ENV_BATCH_WINDOW_MS = "PHI3_BATCH_WINDOW_MS"
# "auto" measures after load whether a lone request is faster on a Generator; "generator" and
# "engine" force the choice (the benchmark and tests use them to compare the paths).
ENV_SOLO_PATH = "PHI3_SOLO_PATH"
SOLO_PATHS = ("auto", "generator", "engine")
DEFAULT_BATCH_WINDOW_S = 0.02
# Threads that may wait on the engine at once: each open stream holds one while it reads.
MAX_OPEN_STREAMS = 256
# The per-request path must beat the engine by this much to be chosen; less is noise.
_SOLO_MARGIN = 1.05
_CALIBRATION_TOKENS = 16
_CALIBRATION_ROUNDS = 3
# onnxruntime-genai 0.18's static scheduler (`StaticBatchScheduler::Schedule`, the CPU one: no
# PagedAttention graph there) decodes this many of its turns per step, whatever max_batch_size is
# configured (which it only reports back); the rest wait. The scheduler here admits at most
# max_batch_size turns to a batch, so a smaller one does narrow it. Measured against the installed
# engine by tests/serving/test_serving_static_batch.py, which fails when an upgrade changes it.
STATIC_BATCH_DECODE_WIDTH = 4
# The generation that proves at load that the model answers (and warms its kernels).
_WARM_UP_TOKENS = 4

logger = logging.getLogger(__name__)

_FINISH_REASONS = {
    "EOS": "stop",
    "STOP_STRING": "stop",
    "MAX_GENERATED_TOKENS": "length",
    "MAX_SESSION_TOKENS": "length",
    "CANCELLED": "cancelled",
    "FAILED": "error",
}


@dataclass(frozen=True)
class BatchOptions:
    max_batch_size: int | None = None  # None: the engine's own configured_max_batch_size
    batch_window_s: float = DEFAULT_BATCH_WINDOW_S
    solo_path: str = "auto"


def batch_options_from_env(env: Mapping[str, str]) -> BatchOptions:
    raw_batch = env.get(ENV_MAX_BATCH_SIZE, "")
    max_batch: int | None = None
    if raw_batch:
        try:
            max_batch = int(raw_batch)
        except ValueError:
            max_batch = 0
        if not 1 <= max_batch <= 256:
            raise ValueError(f"{ENV_MAX_BATCH_SIZE} must be an integer from 1 to 256, got {raw_batch!r}")
    raw_window = env.get(ENV_BATCH_WINDOW_MS, "")
    window = DEFAULT_BATCH_WINDOW_S
    if raw_window:
        try:
            window = float(raw_window) / 1000
        except ValueError:
            window = -1.0
        if not 0 <= window <= 10:
            raise ValueError(f"{ENV_BATCH_WINDOW_MS} must be milliseconds from 0 to 10000, got {raw_window!r}")
    solo = env.get(ENV_SOLO_PATH) or "auto"
    if solo not in SOLO_PATHS:
        raise ValueError(f"{ENV_SOLO_PATH} must be one of {', '.join(SOLO_PATHS)}, got {solo!r}")
    return BatchOptions(max_batch_size=max_batch, batch_window_s=window, solo_path=solo)


@dataclass(frozen=True)
class _End:
    """The last item on a turn's queue."""

    finish_reason: str
    error: str | None = None


@dataclass(eq=False)
class _Turn:
    prepared: PreparedOnnxRequest
    meter: RequestMeter
    tokens: queue.SimpleQueue[int | _End] = field(default_factory=queue.SimpleQueue)
    request: Any = None  # og.Request once admitted to the engine
    turn_id: int = 0
    generator: Any = None  # og.Generator on the per-request path
    done: bool = False
    arrived_at: float = field(default_factory=time.monotonic)


class OnnxBatchEngine(OnnxEngineBase):
    """An onnxruntime-genai model served by one og.Engine; thread-safe."""

    def __init__(
        self,
        variant: OnnxVariant,
        *,
        defaults: GenerationDefaults | None = None,
        options: BatchOptions | None = None,
    ) -> None:
        import onnxruntime_genai as og

        options = options or BatchOptions()
        engine_section = read_engine_section(variant.path)
        self.dynamic = "dynamic_batching" in engine_section
        engine_overlay = None
        if options.max_batch_size is not None:
            section = "dynamic_batching" if self.dynamic else "static_batching"
            engine_overlay = {section: {"max_batch_size": options.max_batch_size}}
        super().__init__(variant, defaults=defaults, engine_overlay=engine_overlay)
        self._token_flag = int(og.EngineEventFlags.TOKEN)
        self._finished_flag = int(og.EngineEventFlags.TURN_FINISHED)
        self._failed_flag = int(og.EngineEventFlags.FAILED)
        self.max_concurrency = MAX_OPEN_STREAMS
        self._window_s = options.batch_window_s
        self._model_id = f"onnx-genai/{variant.name}"

        self._lock = threading.Condition()
        self._arrivals: deque[_Turn] = deque()
        self._cancels: deque[_Turn] = deque()
        self._closed = False
        # Scheduler-thread state.
        self._in_engine: dict[int, _Turn] = {}  # id(og.Request) -> turn
        self._solo: list[_Turn] = []
        self._inline = 0  # lone requests running on a Generator in their readers' threads
        self._batch_ended_at = 0.0
        self._step_s = 0.0  # how long the engine's last step took
        self._expected = 0  # requests likely to arrive together after the last batch ended
        self._retired = 0  # turns finished in this scheduler iteration

        self._solo_path = options.solo_path
        self.solo_speedup: float | None = None
        self.solo_enabled = options.solo_path == "generator"
        # "auto": rounds of Generator/engine ratios still to measure while idle (the first warms up).
        self._calibration_ratios: list[float] = []
        self._calibration_warm = False
        self._calibrating = options.solo_path == "auto"
        self.max_batch_size = 0
        # og.Engine answers only the thread that created it: the scheduler thread creates it, has it
        # answer once, and then serves (measuring the lone-request paths while idle).
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="phi3-engine-scheduler", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def _run(self) -> None:
        try:
            self._engine = self._og.Engine(self._model)
            self.max_batch_size = int(self._engine.get_capabilities().configured_max_batch_size)
            self._events = self._engine.create_event_buffer(max(64, 4 * self.max_batch_size))
            self._calibration_prompt = self._encode_calibration_prompt()
            self._tokens_per_s_on_engine(self._calibration_prompt, _WARM_UP_TOKENS)
        except BaseException as error:
            self._startup_error = error
            return
        finally:
            self._ready.set()
        self._schedule()

    def describe(self) -> str:
        """One log line: how requests are batched, and which path a lone request takes and why."""
        if self.solo_speedup is not None:
            speedup = f"measured Generator/engine {self.solo_speedup:.2f}x"
        else:
            speedup = "being measured while idle" if self._calibrating else "forced"
        if self.dynamic:
            batch = f"dynamic batching, max batch {self.max_batch_size}"
        else:
            batch = (f"static batching, max batch {self.max_batch_size}, "
                     f"decoding at most {self.decode_width} together per step")
        return (
            f"og.Engine ({batch}; {self.describe_threads()}); "
            f"lone requests on {'a Generator' if self.solo_enabled else 'the engine'} ({speedup})"
        )

    @property
    def decode_width(self) -> int:
        """How many turns one engine step decodes at most: this scheduler admits `max_batch_size`."""
        return self.max_batch_size if self.dynamic else min(self.max_batch_size, STATIC_BATCH_DECODE_WIDTH)

    def attach_metrics(self, metrics: ModelMetrics) -> None:
        self.metrics = metrics
        metrics.set_max_batch(self.max_batch_size)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=5)

    # -- the reader's side (any thread) ------------------------------------------------------------

    def stream(self, request: ChatRequest) -> CancellableStream:
        prepared = self._prepare(request)  # raises InvalidRequestError now, before any stream starts
        turn = _Turn(prepared=prepared, meter=RequestMeter(self.metrics, len(prepared.input_ids)))
        return CancellableStream(self._read(turn), lambda: self._cancel(turn))

    def _generate(self, prepared: PreparedOnnxRequest) -> Iterator[StreamEvent]:
        return self._read(_Turn(prepared=prepared, meter=RequestMeter(self.metrics, len(prepared.input_ids))))

    def _read(self, turn: _Turn) -> Generator[StreamEvent, None, None]:
        prepared = turn.prepared
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            inline = self._may_run_inline_locked()
            if inline:
                self._inline += 1
            else:
                self._arrivals.append(turn)
                self._lock.notify()
        if inline:
            yield from self._read_inline(turn)
            return
        options = prepared.request.options
        stop_filter = StopSequenceFilter(options.stop)
        decode = self._tokenizer.create_stream().decode
        generated = 0
        end: _End | None = None
        try:
            while True:
                item = turn.tokens.get()
                if isinstance(item, _End):
                    end = item
                    break
                generated += 1
                piece = decode(item)
                piece = stop_filter.feed(piece)
                if piece:
                    yield StreamEvent(piece)
                if stop_filter.stopped:
                    break
        finally:
            if end is None:  # a stop string matched, or the reader went away: free the batch slot
                self._cancel(turn)
        if end is not None and end.error is not None:
            raise RuntimeError(f"generation failed: {end.error}")
        if not stop_filter.stopped:
            tail = stop_filter.flush()
            if tail:
                yield StreamEvent(tail)
        stopped = stop_filter.stopped
        finish_reason = "stop" if stopped or end is None else end.finish_reason
        yield StreamEvent(
            "",
            Completion(
                text="",
                finish_reason=finish_reason,
                prompt_tokens=len(prepared.input_ids),
                completion_tokens=generated,
            ),
        )

    def _may_run_inline_locked(self) -> bool:
        """A lone request on an idle engine runs on a Generator in its reader's own thread.

        That is the per-request path with nothing in between: no hand-off of every token between
        threads. Requests that arrive meanwhile batch on the engine as usual.
        """
        if not self.solo_enabled or self._arrivals or self._in_engine or self._solo or self._inline:
            return False
        now = time.monotonic()
        return self._expected <= 1 or now >= self._batch_ended_at + max(self._window_s, self._step_s)

    def _read_inline(self, turn: _Turn) -> Generator[StreamEvent, None, None]:
        try:
            yield from self.generate_alone(turn.prepared, cancelled=lambda: turn.done, meter=turn.meter)
        finally:
            turn.done = True
            with self._lock:
                self._inline -= 1
                if not self._in_engine and not self._solo:
                    # Its client is likely to come back: the window applies as after a batch.
                    self._batch_ended_at = time.monotonic()
                    self._expected = min(self.max_batch_size, 1 + len(self._arrivals))
                self._lock.notify()

    def _cancel(self, turn: _Turn) -> None:
        with self._lock:
            if turn in self._arrivals:
                # Never started: nothing to stop in the engine, and no batch slot to give back.
                self._arrivals.remove(turn)
                self._finish(turn, _End("cancelled"))
                return
            self._cancels.append(turn)
            self._lock.notify()

    # -- the scheduler thread ------------------------------------------------------------------------

    def _schedule(self) -> None:
        while True:
            with self._lock:
                while not (self._arrivals or self._cancels or self._in_engine or self._solo or self._closed):
                    if self._calibrating and not self._inline:
                        break
                    if self.metrics is not None:
                        self.metrics.idle()
                    self._lock.wait()
                if self._closed:
                    break
                calibrate = not (self._arrivals or self._cancels or self._in_engine or self._solo)
                cancels = list(self._cancels)
                self._cancels.clear()
                admitted = [] if calibrate else self._admit_locked()
            if calibrate:
                self._calibrate_one_round()
                continue
            self._retired = 0
            for turn in cancels:
                self._cancel_now(turn)
            # A request that finds nothing else to do, and no other client about to come back, takes
            # the faster path for a lone request.
            alone = (
                len(admitted) == 1
                and not self._in_engine
                and not self._solo
                and not self._inline
                and not self._arrivals
                and self._expected <= 1
            )
            for turn in admitted:
                if turn.done:  # cancelled while it was being admitted
                    continue
                try:
                    self._start(
                        turn, solo=(alone and self.solo_enabled) or turn.prepared.request.options.seed is not None
                    )
                except Exception as error:  # this request cannot start; the others still can
                    self._end(turn, _End("error", f"{type(error).__name__}: {error}"))
            try:
                for turn in list(self._solo):
                    self._step_solo(turn)
                if self._in_engine:
                    self._step_engine()
            except Exception as error:  # the engine is unusable: fail every turn, keep serving errors
                for turn in [*self._in_engine.values(), *self._solo]:
                    self._end(turn, _End("error", f"{type(error).__name__}: {error}"))
                self._in_engine.clear()
                self._solo.clear()
            if self._retired and not self._in_engine and not self._solo:
                # Everything ended: the clients just answered, and those already waiting, are the
                # next batch; the window gives the former time to send their next requests.
                self._batch_ended_at = time.monotonic()
                with self._lock:
                    self._expected = min(self.max_batch_size, self._retired + len(self._arrivals))
        for turn in [*self._in_engine.values(), *self._solo, *self._arrivals]:
            self._end(turn, _End("error", "the engine shut down"))

    def _admit_locked(self) -> list[_Turn]:
        """The arrivals to start now (called with the lock held)."""
        if not self._arrivals:
            return []
        if self.dynamic:
            everyone = list(self._arrivals)
            self._arrivals.clear()
            return everyone
        if self._in_engine:
            return self._solo_only_locked()  # a static batch admits nobody until it ends
        now = time.monotonic()
        # Waiting costs at most one decode step here; starting without the clients about to come
        # back costs them a whole batch. So the window stretches to one step of a slow model.
        window_end = self._batch_ended_at + max(self._window_s, self._step_s)
        if now < window_end and len(self._arrivals) < self._expected:
            # The clients whose batch just ended are likely sending their next requests: wait for
            # them briefly, so they start together instead of one starting a batch alone.
            self._lock.wait(window_end - now)
            return []
        if now >= window_end:
            self._expected = 0  # idle for longer than the window: nobody is coming back soon
            if not self._solo:
                # A burst of new clients arrives over a few milliseconds, and the first must not
                # start a batch the others then wait out: gather for a quarter of the window.
                gather_end = self._arrivals[0].arrived_at + self._window_s / 4
                if now < gather_end:
                    self._lock.wait(gather_end - now)
                    return []
        admitted: list[_Turn] = []
        while self._arrivals and len(admitted) < self.max_batch_size:
            admitted.append(self._arrivals.popleft())
        return admitted

    def _solo_only_locked(self) -> list[_Turn]:
        """While a static batch runs, seeded turns (which never join it) may still start."""
        seeded = [turn for turn in self._arrivals if turn.prepared.request.options.seed is not None]
        for turn in seeded:
            self._arrivals.remove(turn)
        return seeded

    def _start(self, turn: _Turn, *, solo: bool) -> None:
        options = turn.prepared.request.options
        if solo:
            turn.generator = self._og.Generator(self._model, self.generator_params(turn.prepared))
            turn.generator.append_tokens(turn.prepared.input_ids)
            self._solo.append(turn)
            return
        request = self._engine.create_request()
        turn_options = self._og.TurnOptions(request)
        turn_options.set_max_generated_tokens(turn.prepared.max_new_tokens)
        if options.min_tokens:
            turn_options.set_min_generated_tokens(min(options.min_tokens, turn.prepared.max_new_tokens))
        # top_k 1 is greedy decoding, and og.Engine refuses sampling options beside it.
        if options.greedy or options.top_k == 1:
            turn_options.set_do_sample(False)
            turn_options.set_temperature(0.0)
        else:
            turn_options.set_do_sample(True)
            turn_options.set_temperature(options.temperature)
            turn_options.set_top_p(options.top_p)
            if options.top_k is not None:
                turn_options.set_top_k(self.og_top_k(options.top_k))
        if options.guidance is not None:
            turn_options.set_guidance(options.guidance.kind, options.guidance.grammar)
        turn.turn_id = request.begin_turn(turn.prepared.input_ids, turn_options)
        turn.request = request  # the engine drops a request whose Python object is collected
        self._in_engine[id(request)] = turn

    def _step_solo(self, turn: _Turn) -> None:
        generator = turn.generator
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        self._token(turn, token)
        if generator.is_done():
            self._end(turn, _End("stop" if token in self._eos_token_ids else "length"))

    def _step_engine(self) -> None:
        batch = 0
        started = time.monotonic()
        events = self._engine.run(self._events)
        self._step_s = time.monotonic() - started
        for event in events:
            turn = self._in_engine.get(id(event.request))
            if turn is None:
                continue
            flags = int(event.flags)
            if flags & self._token_flag:
                batch += 1
                self._token(turn, int(event.token))
            if flags & self._failed_flag:
                self._end(turn, _End("error", f"the engine failed the request ({event.error_code.name})"))
            elif flags & self._finished_flag:
                self._end(turn, _End(_FINISH_REASONS.get(event.finish_reason.name, "stop")))
        if batch and self.metrics is not None:
            self.metrics.step(batch)

    def _token(self, turn: _Turn, token: int) -> None:
        turn.meter.token()
        turn.tokens.put(token)

    def _end(self, turn: _Turn, end: _End) -> None:
        """Retire a started turn (scheduler thread)."""
        if turn.done:
            return
        if turn.request is not None:
            self._in_engine.pop(id(turn.request), None)
            turn.request.close()
            turn.request = None
        if turn.generator is not None:
            self._solo.remove(turn)
            turn.generator = None
        self._retired += 1
        self._finish(turn, end)

    @staticmethod
    def _finish(turn: _Turn, end: _End) -> None:
        turn.done = True
        turn.meter.finish(end.finish_reason)
        turn.tokens.put(end)

    def _cancel_now(self, turn: _Turn) -> None:
        if turn.done:
            return
        if turn.request is not None:
            # The engine drops the turn from its batch and confirms with a CANCELLED event at its
            # next step, which is when the turn stops counting as running.
            turn.request.cancel_turn(turn.turn_id)
            return
        self._end(turn, _End("cancelled"))

    # -- the lone-request measurement (after load, while idle) ---------------------------------------

    def _encode_calibration_prompt(self) -> Any:
        import numpy as np

        return np.asarray(self._tokenizer.encode("Once upon a time"), dtype=np.int32)

    def _tokens_per_s_on_generator(self, prompt: Any, tokens: int = _CALIBRATION_TOKENS) -> float:
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(prompt) + tokens, do_sample=False)
        generator = self._og.Generator(self._model, params)
        started = time.perf_counter()
        generator.append_tokens(prompt)
        produced = 0
        while not generator.is_done():
            generator.generate_next_token()
            produced += 1
        return produced / (time.perf_counter() - started)

    def _tokens_per_s_on_engine(self, prompt: Any, tokens: int = _CALIBRATION_TOKENS) -> float:
        request = self._engine.create_request()
        options = self._og.TurnOptions(request)
        options.set_max_generated_tokens(tokens)
        options.set_do_sample(False)
        started = time.perf_counter()
        request.begin_turn(prompt, options)
        produced = 0
        while self._engine.has_pending_requests():
            for event in self._engine.run(self._events):
                produced += int(event.flags) & self._token_flag
        request.close()
        return produced / (time.perf_counter() - started)

    def _calibrate_one_round(self) -> None:
        """One round of the lone-request measurement (tokens/s on a Generator over tokens/s on the
        engine; the median of the rounds decides), run by the scheduler thread while nothing else
        runs. A round is two short generations, so a request that arrives meanwhile waits at most that."""
        prompt = self._calibration_prompt
        try:
            if not self._calibration_warm:
                self._tokens_per_s_on_generator(prompt)
                self._calibration_warm = True
                return
            self._calibration_ratios.append(
                self._tokens_per_s_on_generator(prompt) / self._tokens_per_s_on_engine(prompt))
        except Exception as error:  # the engine path still serves; only the faster lone path is lost
            logger.warning("could not measure the lone-request paths (%s: %s); lone requests use the engine",
                           type(error).__name__, error)
            with self._lock:
                self._calibrating = False
            return
        if len(self._calibration_ratios) < _CALIBRATION_ROUNDS:
            return
        speedup = statistics.median(self._calibration_ratios)
        with self._lock:
            self.solo_speedup = speedup
            self.solo_enabled = speedup >= _SOLO_MARGIN
            self._calibrating = False
        logger.info("%s", self.describe())


def read_engine_section(folder: Any) -> dict[str, Any]:
    """genai_config.json's `engine` section (empty when the export has none)."""
    from phi3_serving.variants import read_genai_config

    section = read_genai_config(folder).get("engine") or {}
    return dict(section) if isinstance(section, dict) else {}


