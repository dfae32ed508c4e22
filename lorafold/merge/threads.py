"""Torch threads for a CPU merge, chosen from measurements as the merge runs.

CtM does a few large ops per module (the float64 Gram of the stacked factors, products
with the implicit bases, two R×R eigendecompositions) and many small R×R and r×r ops.
With as many OpenMP threads as cores, every op ends in a barrier that waits for all
threads; when another process holds one of the cores, that wait lasts a scheduler time
slice. So each kind of big op, and each module's small ops as a whole, run on whichever
of 1 or all threads has recently been faster for them; every few calls try the other
count, so the choice follows the machine's load as it changes.

Measured on 2 shared cores (`merge_adapters`, 8 Llama-2-7B layers, T = 8, medians of 6 to
8 alternating runs): idle, all threads 1.07 s, this policy 1.10 s; beside one busy
process, all threads 3.67 s, this policy 1.96 s (one thread throughout: 1.4 s, but 1.45 s
idle; small ops on one thread and big ops on all: 2.6 s). torch's thread count is
process-wide: a merge owns it while it runs (lorafold runs one merge per worker process)
and restores it at the end.

The merge's count is the process's torch count: in the service, cores ÷ workers (the
launcher sets each worker's). Within it, the current load decides where measuring starts
and what dense ops get (`available_threads`): those ops (mtc's m×n products and SVDs)
take seconds, so they are not probed; they take the cores other processes leave free.
Issue 11 measured mtc on all threads beside one busy process 37× slower than on one.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

LOAD_WINDOW_S = 60.0                  # the time constant of the 1-minute load average


class OwnLoad:
    """This process's share of the load average: its CPU use (cores' worth), averaged with
    the kernel's 1-minute time constant, so it can be taken out of `os.getloadavg()`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 cpu: Callable[[], float] = lambda: sum(os.times()[:2])) -> None:
        self._clock, self._cpu = clock, cpu
        self._wall, self._used = clock(), cpu()
        self.rate = 0.0

    def sample(self) -> float:
        wall, used = self._clock(), self._cpu()
        if used < self._used:           # a forked child: its CPU time started again at 0
            self._wall, self._used, self.rate = wall, used, 0.0
        elapsed = wall - self._wall
        if elapsed > 0.05:
            keep = math.exp(-elapsed / LOAD_WINDOW_S)
            current = (used - self._used) / elapsed
            self.rate = keep * self.rate + (1.0 - keep) * current
            self._wall, self._used = wall, used
        return self.rate


_OWN_LOAD = OwnLoad()


def available_threads(limit: int, *, load: Callable[[], float] | None = None,
                      own: Callable[[], float] | None = None,
                      cores: int | None = None) -> int:
    """The threads a merge can expect to get now, at most `limit`, at least 1: the cores
    less the load of other processes (the 1-minute load average less our own share)."""
    total = cores if cores is not None else (os.cpu_count() or 1)
    others = (load or (lambda: os.getloadavg()[0]))() - (own or _OWN_LOAD.sample)()
    return max(1, min(limit, math.floor(total - max(others, 0.0) + 0.5)))


@dataclass
class ThreadChooser:
    """The thread count for the next op of one kind: the faster recently, probing the other.

    It measures `start` first (the count the load suggests), then the other of all
    threads and one.
    """

    threads: int                      # all threads the merge started with
    probe_every: int = 16             # every n-th op tries the count that is not the best
    smoothing: float = 0.3            # weight of the newest measurement in the rate
    rates: dict[int, float] = field(default_factory=dict)   # thread count -> flop/s
    calls: int = 0
    start: int | None = None          # the first count to measure (default: all threads)

    def choose(self) -> int:
        self.calls += 1
        first = self.threads if self.start is None or self.start > 1 else 1
        for candidate in (first, self.threads if first == 1 else 1):
            if candidate not in self.rates:
                return candidate
        best = max(self.rates, key=self.rates.__getitem__)
        if self.calls % self.probe_every == 0:
            return 1 if best == self.threads else self.threads
        return best

    def record(self, threads: int, flops: float, seconds: float) -> None:
        rate = flops / max(seconds, 1e-9)
        old = self.rates.get(threads)
        self.rates[threads] = rate if old is None else (
            self.smoothing * rate + (1 - self.smoothing) * old)


@dataclass
class _MergeThreads:
    threads: int                                  # what the merge started with
    choosers: dict[str, ThreadChooser]            # per kind of big op, and "small"
    baseline: int = 1                             # threads for the current module's small ops
    big_seconds: float = 0.0                      # time spent inside big ops so far
    start: int | None = None                      # what the load suggested at the start

    def chooser(self, kind: str) -> ThreadChooser:
        return self.choosers.setdefault(kind, ThreadChooser(self.threads, start=self.start))


@contextlib.contextmanager
def _setting(get: Callable[[], Any], put: Callable[[Any], Any], value: Any) -> Iterator[None]:
    """A process-wide setting at `value` inside, the caller's value restored after."""
    before = get()
    put(value)
    try:
        yield
    finally:
        put(before)


def gil_switch_interval(seconds: float) -> contextlib.AbstractContextManager[None]:
    """Python's thread switch interval at `seconds` inside (process-wide). Threads that
    each run many small torch ops wait for the GIL between them; at the default 5 ms a
    waiting thread can lose most of a slice to a thread running plain Python (measured in
    `executor.GIL_SWITCH_S`)."""
    return _setting(sys.getswitchinterval, sys.setswitchinterval, seconds)


def torch_threads(count: int) -> contextlib.AbstractContextManager[None]:
    """torch on `count` threads inside, the caller's count restored after."""
    return _setting(torch.get_num_threads, torch.set_num_threads, count)


_ACTIVE: ContextVar[_MergeThreads | None] = ContextVar("merge_threads", default=None)


@contextlib.contextmanager
def adaptive_threads(learnt: dict[str, ThreadChooser] | None = None) -> Iterator[None]:
    """Let `module_ops` and `big_op` choose torch's thread count inside; restore it after.

    For CPU merges only: the choice times ops with the wall clock, which asynchronous GPU
    kernels would defeat. `learnt` carries the measured rates from one block to the next
    (the benchmark times CtM in many short blocks, as one merge would run them).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    token = _ACTIVE.set(_MergeThreads(threads, {} if learnt is None else learnt,
                                      start=available_threads(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _ACTIVE.reset(token)


@contextlib.contextmanager
def module_ops() -> Iterator[None]:
    """One module's small ops, on the thread count that has recently run them faster.

    They cost about the same in every module (R×R and r×r work), so their time outside
    the big ops is compared directly.
    """
    active = _ACTIVE.get()
    if active is None:
        yield
        return
    chooser = active.chooser("small")
    active.baseline = chooser.choose()
    torch.set_num_threads(active.baseline)
    big_before, started = active.big_seconds, time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started - (active.big_seconds - big_before)
        chooser.record(active.baseline, 1.0, elapsed)


@contextlib.contextmanager
def big_op(kind: str, flops: float) -> Iterator[None]:
    """A large op of about `flops` flops: run it on the thread count chosen for its `kind`.

    Rates are kept per kind (a memory-bound product and a GEMM run at different rates), so
    a probe of one kind never decides for another. Outside a merge this does nothing.
    """
    active = _ACTIVE.get()
    if active is None:
        yield
        return
    chooser = active.chooser(kind)
    threads = chooser.choose()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        chooser.record(threads, flops, elapsed)
        active.big_seconds += elapsed
        torch.set_num_threads(active.baseline)


@contextlib.contextmanager
def all_threads(available: Callable[[int], int] = available_threads) -> Iterator[None]:
    """Ops that take seconds (dense m×n work): the merge's threads that the current load
    leaves free (`available`), no measuring — a probe on one thread would cost seconds,
    and oversubscribed cores are what makes these ops slow."""
    active = _ACTIVE.get()
    if active is None:
        yield
        return
    torch.set_num_threads(available(active.threads))
    try:
        yield
    finally:
        torch.set_num_threads(active.baseline)
