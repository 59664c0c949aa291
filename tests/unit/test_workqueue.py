"""The reconcile work queue: coalescing, one worker per key, planned requeues, failures with backoff, forgetting."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from phi3_operator.workqueue import Retry, WorkQueue, backoff_s


def latest(_: str, new: str) -> str:
    return new


def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.mark.parametrize(("failures", "ceiling", "expected"), [
    (1, 60.0, 5.0), (2, 60.0, 10.0), (3, 60.0, 20.0), (5, 60.0, 60.0), (50, 1000.0, 300.0), (1, 2.0, 2.0),
])
def test_backoff_doubles_per_failure_within_the_ceiling(failures: int, ceiling: float, expected: float) -> None:
    assert backoff_s(failures, ceiling) == expected


def test_items_for_a_waiting_key_are_merged_and_handled_once() -> None:
    release = threading.Event()
    calls: list[tuple[str, str]] = []

    def handler(key: str, item: str) -> None:
        calls.append((key, item))
        if item == "first":
            release.wait(5)

    queue: WorkQueue[str, str] = WorkQueue(handler, lambda old, new: old + "+" + new, workers=2)
    queue.start()
    try:
        queue.add("a", "first")
        wait_for(lambda: len(calls) == 1)
        queue.add("a", "second")
        queue.add("a", "third")
        time.sleep(0.1)
        assert len(calls) == 1, "a key being handled is not given to a second worker"
        release.set()
        wait_for(lambda: len(calls) == 2)
        time.sleep(0.1)
        assert calls == [("a", "first"), ("a", "second+third")]
        assert queue.waiting() == 0
    finally:
        queue.stop()


def test_keys_are_handled_in_parallel_but_never_one_key_twice_at_once() -> None:
    running: dict[str, int] = {}
    overlap: list[str] = []
    most = [0]
    guard = threading.Lock()

    def handler(key: str, _: str) -> None:
        with guard:
            running[key] = running.get(key, 0) + 1
            if running[key] > 1:
                overlap.append(key)
            most[0] = max(most[0], sum(running.values()))
        time.sleep(0.02)
        with guard:
            running[key] -= 1

    queue: WorkQueue[str, str] = WorkQueue(handler, latest, workers=4)
    queue.start()
    try:
        for round_ in range(5):
            for key in "abcd":
                queue.add(key, str(round_))
            time.sleep(0.005)
        wait_for(lambda: queue.waiting() == 0 and not any(running.values()))
        assert overlap == []
        assert most[0] > 1, "different keys run side by side"
    finally:
        queue.stop()


def test_a_failure_waits_for_its_backoff_then_runs_again() -> None:
    calls: list[float] = []

    def handler(_: str, __: str) -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise Retry("not yet", ceiling_s=10.0)

    queue: WorkQueue[str, str] = WorkQueue(handler, latest, workers=1, retry_base_s=0.1)
    queue.start()
    try:
        queue.add("a", "x")
        wait_for(lambda: len(calls) == 3)
        time.sleep(0.3)
        assert len(calls) == 3, "success ends the retries"
        assert calls[1] - calls[0] >= 0.1 and calls[2] - calls[1] >= 0.2, "the wait doubles"
    finally:
        queue.stop()


def test_a_failure_backs_off_no_longer_than_its_ceiling() -> None:
    calls: list[float] = []

    def handler(_: str, __: str) -> None:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise Retry("not yet", ceiling_s=0.1)

    queue: WorkQueue[str, str] = WorkQueue(handler, latest, workers=1, retry_base_s=0.08)
    queue.start()
    try:
        queue.add("a", "x")
        wait_for(lambda: len(calls) == 4)
        gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
        assert gaps[0] >= 0.08 and all(gap < 0.15 for gap in gaps[1:]), gaps
    finally:
        queue.stop()


def test_a_planned_requeue_does_not_back_off() -> None:
    calls: list[float] = []

    def handler(_: str, __: str) -> float | None:
        calls.append(time.monotonic())
        return 0.1 if len(calls) < 5 else None

    queue: WorkQueue[str, str] = WorkQueue(handler, latest, workers=1, retry_base_s=1.0)
    queue.start()
    try:
        queue.add("a", "x")
        wait_for(lambda: len(calls) == 5)
        gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
        assert all(0.1 <= gap < 0.3 for gap in gaps), f"a poll every 0.1 s, not a doubling wait: {gaps}"
        time.sleep(0.3)
        assert len(calls) == 5, "None ends the polling"
    finally:
        queue.stop()


def test_a_success_resets_the_backoff() -> None:
    calls: list[float] = []
    # fail, fail, succeed with a requeue, fail: the last failure waits the first step again, not the third
    script = ["fail", "fail", "requeue", "fail", "done"]

    def handler(_: str, __: str) -> float | None:
        step = script[len(calls)]
        calls.append(time.monotonic())
        if step == "fail":
            raise Retry(step)
        return 0.01 if step == "requeue" else None

    queue: WorkQueue[str, str] = WorkQueue(handler, latest, workers=1, retry_base_s=0.1)
    queue.start()
    try:
        queue.add("a", "x")
        wait_for(lambda: len(calls) == 5)
        assert calls[2] - calls[1] >= 0.2, "the second failure in a row waits twice as long"
        assert calls[4] - calls[3] < 0.2, "after a success the count starts again"
    finally:
        queue.stop()


def test_new_work_during_a_failing_attempt_runs_at_once() -> None:
    calls: list[str] = []
    started = threading.Event()
    release = threading.Event()

    def handler(_: str, item: str) -> None:
        calls.append(item)
        if item == "old":
            started.set()
            release.wait(5)
            raise Retry("failed", ceiling_s=60.0)

    queue: WorkQueue[str, str] = WorkQueue(handler, latest, workers=1, retry_base_s=60.0)
    queue.start()
    try:
        queue.add("a", "old")
        started.wait(5)
        queue.add("a", "new")
        release.set()
        wait_for(lambda: calls == ["old", "new"], timeout=2)
    finally:
        queue.stop()


def test_an_exception_is_logged_and_retried_and_the_worker_survives(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def handler(key: str, _: str) -> None:
        calls.append(key)
        if key == "bad" and calls.count("bad") == 1:
            raise RuntimeError("boom")

    queue: WorkQueue[str, str] = WorkQueue(handler, latest, workers=1, retry_base_s=0.05)
    queue.start()
    try:
        queue.add("bad", "x")
        wait_for(lambda: calls.count("bad") == 2)
        queue.add("good", "y")
        wait_for(lambda: "good" in calls)
        assert "handling bad failed" in caplog.text and "Traceback" in caplog.text
    finally:
        queue.stop()


def test_a_forgotten_key_is_not_retried() -> None:
    calls: list[str] = []
    started = threading.Event()
    release = threading.Event()

    def handler(key: str, _: str) -> float:
        calls.append(key)
        started.set()
        release.wait(5)
        return 0.01

    queue: WorkQueue[str, str] = WorkQueue(handler, latest, workers=1, retry_base_s=0.01)
    queue.start()
    try:
        queue.add("gone", "x")
        started.wait(5)
        queue.forget("gone")
        release.set()
        time.sleep(0.3)
        assert calls == ["gone"]
        assert queue.waiting() == 0
    finally:
        queue.stop()
