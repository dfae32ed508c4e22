"""Bounded background stages for the module-by-module merge: read ahead, write behind.

A merge spends its time in three kinds of work that need not wait for each other: reading
(and hashing, and checking) the next module's factors, computing this module, and writing
the previous module's output. `Prefetch` runs a producer in one thread at most `depth`
items ahead of its consumer; `WriteBehind` runs a consumer in one thread at most `depth`
items behind its producer. Both are bounded by a count of items in flight, so the memory
of a merge stays a few modules' worth however long the model, and both hand an error in
their thread to the caller's thread, and stop promptly when the caller stops.

The helper threads run torch on one thread: the merge's own compute owns the cores
(`threads`), and a second OpenMP team spinning beside it would slow both.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Generic, TypeVar

import torch

In = TypeVar("In")
Out = TypeVar("Out")

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _single_threaded(body: Callable[[], None], restore: int) -> Callable[[], None]:
    """`body` with torch on one thread in this (helper) thread.

    torch's count is also a process-wide default that threads started later begin with,
    so the caller's count is put back when the helper ends.
    """
    def run() -> None:
        torch.set_num_threads(1)
        try:
            body()
        finally:
            torch.set_num_threads(restore)
    return run


class Prefetch(Generic[In, Out]):
    """`produce(item)` for each item, in order, in a background thread, at most `depth`
    results ahead of the consumer.

    Iterate to get the results; a result counts as in flight from the moment its
    production starts until the consumer asks for the next one (it is done with it then),
    so at most `depth + 1` exist at once (`max_in_flight` records the most seen). An
    exception in `produce` is raised in the consumer at that item. Leaving the context
    (or `close`) stops the producer and waits for it.
    """

    def __init__(self, items: Sequence[In], produce: Callable[[In], Out], *, depth: int = 1,
                 name: str = "prefetch") -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._items = items
        self._produce = produce
        self._slots = threading.Semaphore(depth + 1)
        self._results: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self.max_in_flight = 0
        self._held = False                      # the consumer holds a slot (its current item)
        self._thread = threading.Thread(
            target=_single_threaded(self._run, torch.get_num_threads()), name=name,
            daemon=True)
        self._thread.start()

    def _count(self, change: int) -> None:
        with self._lock:
            self._in_flight += change
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _run(self) -> None:
        try:
            for item in self._items:
                self._slots.acquire()
                if self._stop.is_set():
                    return
                self._count(+1)
                self._results.put(self._produce(item))
        except BaseException as e:  # handed to the consumer, raised there
            self._results.put(_Failure(e))
            return
        self._results.put(_DONE)

    def __iter__(self) -> Iterator[Out]:
        while True:
            self._release_current()
            result = self._results.get()
            if result is _DONE:
                return
            if isinstance(result, _Failure):
                raise result.error
            self._held = True
            yield result  # type: ignore[misc]  # everything else is a produced item

    def _release_current(self) -> None:
        if self._held:
            self._held = False
            self._count(-1)
            self._slots.release()

    def close(self) -> None:
        """Stop producing (after the item in progress) and wait for the thread."""
        self._stop.set()
        self._slots.release()                   # a producer waiting for a slot wakes, stops
        self._thread.join()
        self._release_current()

    def __enter__(self) -> Prefetch[In, Out]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class WriteBehind(Generic[In]):
    """`consume(item)` for each `put` item, in order, in a background thread, at most
    `depth` items behind.

    `put` raises the consumer's error, if it failed, and blocks while `depth` items wait.
    `finish` waits for every item to be consumed (raising a failure); leaving the context
    without `finish` (the producer failed) drops what waits and stops the thread.
    """

    def __init__(self, consume: Callable[[In], None], *, depth: int = 1,
                 name: str = "write-behind") -> None:
        self._consume = consume
        self._items: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_single_threaded(self._run, torch.get_num_threads()), name=name,
            daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._items.get()
            if item is _DONE or self._stop.is_set():
                return
            try:
                self._consume(item)  # type: ignore[arg-type]  # only `put` items get here
            except BaseException as e:  # kept for the producer, raised at its next call
                self._error = e
                self._drain()
                return

    def _drain(self) -> None:
        """Empty the queue so a blocked `put` returns (and then sees the error)."""
        while True:
            try:
                self._items.get_nowait()
            except queue.Empty:
                return

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item: In) -> None:
        self._check()
        while self._thread.is_alive():
            try:
                self._items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        self._check()

    def finish(self) -> None:
        """Wait until everything put is consumed; raise the consumer's error, if any."""
        if self._thread.is_alive():
            self._items.put(_DONE)
            self._thread.join()
        self._check()

    def abort(self) -> None:
        self._stop.set()
        self._drain()
        if self._thread.is_alive():
            self._items.put(_DONE)
        self._thread.join()

    def __enter__(self) -> WriteBehind[In]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()
