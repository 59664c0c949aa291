"""A keyed work queue with coalescing and per-key backoff, drained by a fixed set of threads.

This is the shape of controller-runtime's workqueue. kopf's handlers and the periodic resync only put
work here and return, so kopf does not hold every object's event, body and cause while the API server
is busy; what waits is one small item per object, and a burst of events for one object is worked on once.

A handler returns None when done, or seconds until a planned look again (no backoff); it raises when
the work failed, and only then does the key back off.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Returns None when the work is done, else seconds until it is to be looked at again.
Handler = Callable[[K, V], "float | None"]
Merge = Callable[[V, V], V]


class Retry(Exception):
    """A failure the handler has already reported: retried with backoff, at most `ceiling_s` apart,
    and logged in one line (other exceptions are logged with their traceback)."""

    def __init__(self, message: str, ceiling_s: float = float("inf")) -> None:
        super().__init__(message)
        self.ceiling_s = ceiling_s


def backoff_s(failures: int, ceiling: float, base: float = 5.0, cap: float = 300.0) -> float:
    """5 s, 10 s, 20 s ... per consecutive failure, never above `ceiling` or `cap`."""
    return float(min(ceiling, cap, base * 2 ** min(max(failures - 1, 0), 8)))


class WorkQueue(Generic[K, V]):
    """At most one worker handles a key at a time; an item queued for a key already waiting is merged
    into it, and one queued while the key is being handled runs right after."""

    def __init__(self, handler: Handler[K, V], merge: Merge[V], workers: int, name: str = "work",
                 retry_base_s: float = 5.0, retry_cap_s: float = 300.0) -> None:
        self._handler = handler
        self._merge = merge
        self._workers = workers
        self._name = name
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._cond = threading.Condition()
        self._items: dict[K, V] = {}  # waiting, by key
        self._due: dict[K, float] = {}  # when each waiting key may run
        self._heap: list[tuple[float, int, K]] = []  # (due, tiebreak, key); stale entries are skipped
        self._order = itertools.count()
        self._active: set[K] = set()
        self._failures: dict[K, int] = {}
        self._forgotten: set[K] = set()  # forgotten while a worker held them: not to be retried
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def start(self) -> None:
        for number in range(self._workers):
            thread = threading.Thread(target=self._run, name=f"{self._name}-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)

    def add(self, key: K, item: V, delay_s: float = 0.0) -> None:
        with self._cond:
            self._put(key, item, time.monotonic() + delay_s)

    def forget(self, key: K) -> None:
        with self._cond:
            self._items.pop(key, None)
            self._due.pop(key, None)
            self._failures.pop(key, None)
            if key in self._active:
                self._forgotten.add(key)

    def waiting(self) -> int:
        with self._cond:
            return len(self._items)

    def _put(self, key: K, item: V, due: float) -> None:
        self._forgotten.discard(key)
        if key in self._items:
            item = self._merge(self._items[key], item)
            due = min(due, self._due[key])
        self._items[key] = item
        self._due[key] = due
        if key not in self._active:
            heapq.heappush(self._heap, (due, next(self._order), key))
            self._cond.notify()

    def _take(self) -> tuple[K, V] | None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._heap:
                    due, _, key = self._heap[0]
                    if self._due.get(key) != due or key in self._active:
                        heapq.heappop(self._heap)  # superseded, forgotten, or requeued when its worker ends
                        continue
                    if due > now:
                        break
                    heapq.heappop(self._heap)
                    self._active.add(key)
                    del self._due[key]
                    return key, self._items.pop(key)
                self._cond.wait(self._heap[0][0] - now if self._heap else None)
            return None

    def _done(self, key: K, item: V, requeue_after: float | None, failed_ceiling: float | None) -> None:
        with self._cond:
            self._active.discard(key)
            if key in self._forgotten:
                self._forgotten.discard(key)
                return
            if failed_ceiling is None:
                self._failures.pop(key, None)
            else:
                self._failures[key] = self._failures.get(key, 0) + 1
            if key in self._items:  # newer work came in meanwhile: it runs now and supersedes the retry
                heapq.heappush(self._heap, (self._due[key], next(self._order), key))
                self._cond.notify()
            elif failed_ceiling is not None:
                self._put(key, item, time.monotonic() + backoff_s(self._failures[key], failed_ceiling,
                                                             self._retry_base_s, self._retry_cap_s))
            elif requeue_after is not None:
                self._put(key, item, time.monotonic() + requeue_after)

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            key, item = taken
            requeue_after: float | None = None
            failed_ceiling: float | None = None
            try:
                requeue_after = self._handler(key, item)
            except Retry as failure:
                logger.warning("%s: %s failed, retrying with backoff: %s", self._name, key, failure)
                failed_ceiling = failure.ceiling_s
            except Exception:  # a worker must outlive any one object's failure
                logger.exception("%s: handling %s failed; retrying with backoff", self._name, key)
                failed_ceiling = float("inf")
            self._done(key, item, requeue_after, failed_ceiling)
