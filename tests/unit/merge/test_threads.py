"""The merge's thread policy: small ops on one thread, big ops on the measured faster count."""

from __future__ import annotations

import torch

from lorafold.merge.threads import (
    ThreadChooser,
    adaptive_threads,
    all_threads,
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
                    with all_threads():
                        assert torch.get_num_threads() == 2
                    assert torch.get_num_threads() == small
        assert torch.get_num_threads() == 2
        assert set(learnt) == {"small", "gram"} and set(learnt["gram"].rates) == {1, 2}
    finally:
        torch.set_num_threads(before)
