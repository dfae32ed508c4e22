"""The merge's thread policy: small ops on one thread, big ops on the measured faster count."""

from __future__ import annotations

import math

import torch

from lorafold.merge.threads import (
    OwnLoad,
    ThreadChooser,
    adaptive_threads,
    all_threads,
    available_threads,
    big_op,
    module_ops,
)


def run(chooser: ThreadChooser, seconds: dict[int, float], calls: int) -> list[int]:
    picks = []
    for _ in range(calls):
        threads = chooser.choose()
        chooser.record(threads, 1e9, seconds[threads])
        picks.append(threads)
    return picks


def test_tries_both_then_keeps_the_faster_and_probes_the_other() -> None:
    chooser = ThreadChooser(threads=4, probe_every=8)
    picks = run(chooser, {4: 1.0, 1: 3.0}, 32)
    assert picks[:2] == [4, 1]
    assert picks.count(1) == 1 + 4           # the first try, then every 8th call
    assert all(p == 1 for i, p in enumerate(picks, start=1) if i % 8 == 0)


def test_follows_a_change_of_load() -> None:
    chooser = ThreadChooser(threads=2, probe_every=4)
    assert run(chooser, {2: 1.0, 1: 1.6}, 12)[-4:] == [2, 2, 2, 1]     # idle: all threads
    busy = run(chooser, {2: 4.0, 1: 1.6}, 24)                          # a busy neighbour
    assert busy[-12:] == [1, 1, 1, 2] * 3                              # 1, probing 2


def test_threads_are_restored_and_nothing_changes_outside_a_merge() -> None:
    before = torch.get_num_threads()
    with module_ops(), big_op("gram", 1e6):
        assert torch.get_num_threads() == before
    torch.set_num_threads(2)
    try:
        learnt: dict[str, ThreadChooser] = {}
        with adaptive_threads(learnt):
            for _ in range(3):
                with module_ops():
                    small = torch.get_num_threads()
                    with big_op("gram", 1e6):
                        assert torch.get_num_threads() in (1, 2)
                    assert torch.get_num_threads() == small      # back to the module's
                    with all_threads(available=lambda limit: limit):
                        assert torch.get_num_threads() == 2
                    with all_threads(available=lambda limit: 1):   # a busy machine
                        assert torch.get_num_threads() == 1
                    assert torch.get_num_threads() == small
        assert torch.get_num_threads() == 2
        assert set(learnt) == {"small", "gram"} and set(learnt["gram"].rates) == {1, 2}
    finally:
        torch.set_num_threads(before)


def test_available_threads_are_the_cores_other_processes_leave() -> None:
    def avail(load: float, own: float, limit: int = 2, cores: int = 2) -> int:
        return available_threads(limit, load=lambda: load, own=lambda: own, cores=cores)

    assert avail(0.1, 0.0) == 2                 # idle
    assert avail(2.1, 2.0) == 2                 # the load is our own merge
    assert avail(1.0, 0.0) == 1                 # one busy neighbour on two cores
    assert avail(5.0, 1.0) == 1                 # never below one
    assert avail(0.0, 0.0, limit=1) == 1        # never above the merge's own count
    assert avail(3.0, 0.0, limit=8, cores=8) == 5


def test_own_load_follows_cpu_use_with_the_load_average_time_constant() -> None:
    now = {"wall": 0.0, "cpu": 0.0}
    own = OwnLoad(clock=lambda: now["wall"], cpu=lambda: now["cpu"])
    for _ in range(60):                         # two busy cores for 5 minutes
        now["wall"] += 5.0
        now["cpu"] += 10.0
        own.sample()
    assert 1.95 < own.rate <= 2.0
    now["wall"] += 60.0                         # then idle for a minute: decays by 1/e
    assert abs(own.sample() - 2.0 * math.exp(-1.0)) < 0.05
    now["cpu"] = 0.0                            # a forked child: its CPU clock restarts
    now["wall"] += 5.0
    assert own.sample() == 0.0


def test_a_busy_machine_starts_measuring_at_one_thread() -> None:
    chooser = ThreadChooser(threads=2, start=1)
    assert run(chooser, {2: 1.0, 1: 3.0}, 3) == [1, 2, 2]
