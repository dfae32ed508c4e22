"""The merge pipeline: read ahead and write behind, bounded, with errors and cancellation
stopping cleanly — first the two stages on their own, then in a real merge."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafold.adapters import open_adapter
from lorafold.adapters.reader import LoraAdapter, LoraFactors
from lorafold.errors import InvalidAdapter, JobCancelled, NumericalError
from lorafold.merge import MergeRequest, merge_adapters
from lorafold.merge.pipeline import Prefetch, WriteBehind
from lorafold.synthetic import llama_module_shapes, write_random_adapter
from tests.unit.adapters.test_tensor_file import weights


def helper_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("merge-", "test-"))]


def test_prefetch_keeps_order_and_at_most_depth_items_ahead() -> None:
    with Prefetch(range(20), lambda i: i * i, depth=1, name="test-prefetch") as ahead:
        got = []
        for item in ahead:
            time.sleep(0.002)           # a slow consumer: the producer waits for it
            got.append(item)
    assert got == [i * i for i in range(20)]
    assert ahead.max_in_flight == 2     # the one being consumed and the one read ahead
    assert helper_threads() == []


def test_prefetch_raises_the_producers_error_at_its_item_and_stops() -> None:
    produced: list[int] = []

    def produce(i: int) -> int:
        if i == 3:
            raise InvalidAdapter("module 3 is broken", code="non_finite")
        produced.append(i)
        return i

    got = []
    with pytest.raises(InvalidAdapter, match="module 3"), \
            Prefetch(range(10), produce, name="test-prefetch") as ahead:
        got.extend(ahead)
    assert got == [0, 1, 2] and produced == [0, 1, 2]
    assert helper_threads() == []


def test_a_consumer_that_stops_early_stops_the_producer() -> None:
    produced: list[int] = []
    with Prefetch(range(1000), produced.append, depth=2, name="test-prefetch") as ahead:
        for n, _ in enumerate(ahead):
            if n == 2:
                break
    assert len(produced) <= 2 + 1 + 2   # consumed, and at most `depth` + 1 beyond
    assert helper_threads() == []


def test_write_behind_consumes_in_order_and_reports_its_failure() -> None:
    seen: list[int] = []
    with WriteBehind(seen.append, name="test-writer") as behind:
        for i in range(50):
            behind.put(i)
        behind.finish()
    assert seen == list(range(50))

    def fail_at_5(i: int) -> None:
        if i == 5:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), \
            WriteBehind(fail_at_5, name="test-writer") as failing:
        for i in range(1000):
            failing.put(i)
        failing.finish()
    assert helper_threads() == []


def test_helper_threads_leave_the_callers_torch_threads_alone() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    with Prefetch(range(3), lambda _: torch.get_num_threads(), name="test-prefetch") as ahead:
        seen.extend(ahead)
    assert seen == [1, 1, 1] and torch.get_num_threads() == before


# ----------------------------------------------------------------- in a real merge

SHAPES = llama_module_shapes(3, hidden=32, intermediate=48)   # 21 modules


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    return [write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=4, seed=i)
            for i in range(3)]


class CountingAdapter(LoraAdapter):
    """An adapter that counts the modules loaded from it (the test's probe on the input)."""

    loads: list[str]

    def load(self, module: str, *, device: torch.device | str = "cpu",
             check_finite: bool = True) -> LoraFactors:
        self.loads.append(module)
        return super().load(module, device=device, check_finite=check_finite)


def counting(path: Path) -> CountingAdapter:
    adapter = open_adapter(path, label=path.name)
    adapter.__class__ = CountingAdapter
    assert isinstance(adapter, CountingAdapter)
    adapter.loads = []
    return adapter


@pytest.mark.parametrize(("how", "least", "most"), [
    ({"read_ahead": 1}, 1, 2),     # a reader thread: one module ahead of the one merging
    ({"workers": 2}, 2, 2)],       # two at once: two merging, one read for the first free
    ids=["threads", "two-at-once"])
def test_a_merge_reads_a_bounded_number_of_modules_ahead_in_file_order(
        inputs: list[Path], tmp_path: Path, how: dict[str, int], least: int,
        most: int) -> None:
    adapters = [counting(p) for p in inputs]
    ahead: list[int] = []

    def progress(stage: str, fraction: float) -> None:
        if stage == "merge":
            merged = round(fraction * len(SHAPES))
            time.sleep(0.005)           # a slow consumer: the reader would run ahead
            ahead.append(max(len(a.loads) for a in adapters) - merged)

    try:
        result = merge_adapters(adapters, tmp_path / "out", MergeRequest(rank=4),
                                device="cpu", progress=progress, **how)
    finally:
        for adapter in adapters:
            adapter.close()
    assert len(ahead) == len(SHAPES)
    assert least <= max(ahead) <= most
    assert all(a.loads == sorted(a.loads) for a in adapters)   # in file order
    assert [i["sha256"] for i in result.lineage["inputs"]] == [   # hashed on the way
        hashlib.sha256(weights(p).read_bytes()).hexdigest() for p in inputs]


def staging_left(tmp_path: Path) -> list[str]:
    return [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(("how", "reported"), [
    ({"read_ahead": 0}, 7), ({"read_ahead": 1}, 7), ({"workers": 2}, 8 - 3)],
    ids=["in-turn", "threads", "two-at-once"])   # two at once: 3 modules were in flight
def test_cancelling_mid_merge_stops_every_stage_and_writes_nothing(
        inputs: list[Path], tmp_path: Path, how: dict[str, int], reported: int) -> None:
    calls = {"n": 0}
    fractions: list[float] = []

    def checkpoint() -> None:
        calls["n"] += 1
        if calls["n"] == 8:
            raise JobCancelled("cancelled")

    with pytest.raises(JobCancelled):
        merge_adapters(inputs, tmp_path / "out", MergeRequest(rank=4), device="cpu",
                       checkpoint=checkpoint, **how,
                       progress=lambda stage, f: fractions.append(f) if stage == "merge"
                       else None)
    assert not (tmp_path / "out").exists() and staging_left(tmp_path) == []
    assert fractions == sorted(fractions) and len(fractions) == reported
    assert helper_threads() == []


@pytest.mark.parametrize(("read_ahead", "factor", "value"), [
    (0, "lora_A", float("nan")), (1, "lora_A", float("nan")), (0, "lora_B", float("-inf"))],
    ids=["in-turn", "threads", "inf-in-B"])
def test_a_broken_module_late_in_an_input_fails_the_merge_with_nothing_written(
        inputs: list[Path], tmp_path: Path, read_ahead: int, factor: str, value: float) -> None:
    last = sorted(SHAPES)[-1]
    key = f"base_model.model.{last}.{factor}.weight"
    tensors = load_file(str(weights(inputs[1])))
    tensors[key][0, 0] = value
    save_file(tensors, str(weights(inputs[1])))
    with pytest.raises(InvalidAdapter) as caught:
        merge_adapters(inputs, tmp_path / "out", MergeRequest(rank=4), device="cpu",
                       read_ahead=read_ahead)
    assert caught.value.code == "non_finite" and key in caught.value.message
    assert not (tmp_path / "out").exists() and staging_left(tmp_path) == []
    assert helper_threads() == []


def test_the_lineage_records_the_inputs_true_sha256(inputs: list[Path],
                                                    tmp_path: Path) -> None:
    result = merge_adapters(inputs, tmp_path / "out", MergeRequest(rank=4), device="cpu")
    assert [i["sha256"] for i in result.lineage["inputs"]] == [
        hashlib.sha256(weights(p).read_bytes()).hexdigest() for p in inputs]
    with open_adapter(result.out_dir) as written:   # and the header's copy is the same
        assert '"sha256": "' + result.lineage["inputs"][0]["sha256"] in \
            written.metadata["lorafold.lineage"]


def test_helper_threads_only_where_a_core_is_left_for_them() -> None:
    from lorafold.merge.executor import default_read_ahead
    from lorafold.merge.threads import torch_threads

    cores = os.cpu_count() or 1
    with torch_threads(cores):
        assert default_read_ahead(torch.device("cpu")) == 0
    if cores > 1:
        with torch_threads(cores - 1):
            assert default_read_ahead(torch.device("cpu")) == 1
    assert default_read_ahead(torch.device("cuda")) == 1


# ------------------------------------------------------- two modules at once (the CPU's way)

def merged_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_two_modules_at_once_give_what_one_at_a_time_gives(inputs: list[Path],
                                                           tmp_path: Path) -> None:
    switch, threads = sys.getswitchinterval(), torch.get_num_threads()
    one = merge_adapters(inputs, tmp_path / "one", MergeRequest(rank=4), device="cpu",
                         workers=1)
    two = merge_adapters(inputs, tmp_path / "two", MergeRequest(rank=4), device="cpu",
                         workers=2)
    a, b = merged_tensors(one.out_dir), merged_tensors(two.out_dir)
    assert list(a) == list(b) and len(a) == 2 * len(SHAPES)
    for key in a:                       # thread counts may differ: rounding, not more
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    assert one.report["modules"].keys() == two.report["modules"].keys()
    assert sys.getswitchinterval() == switch and torch.get_num_threads() == threads
    assert helper_threads() == []


def test_an_error_in_a_worker_fails_the_merge_with_nothing_written(
        inputs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafold.merge import executor

    real = executor._merge_module
    broken = sorted(SHAPES)[5]

    def merge_module(plan: Any, module: Any, *args: Any) -> Any:
        if module.name.endswith(broken):
            raise NumericalError(f"{module.name}: injected")
        return real(plan, module, *args)

    monkeypatch.setattr(executor, "_merge_module", merge_module)
    with pytest.raises(NumericalError, match="injected"):
        merge_adapters(inputs, tmp_path / "out", MergeRequest(rank=4), device="cpu",
                       workers=2)
    assert not (tmp_path / "out").exists() and staging_left(tmp_path) == []
    assert helper_threads() == []


def test_a_broken_input_fails_a_merge_two_at_once(inputs: list[Path], tmp_path: Path) -> None:
    key = f"base_model.model.{sorted(SHAPES)[-1]}.lora_A.weight"
    tensors = load_file(str(weights(inputs[2])))
    tensors[key][1, 1] = float("nan")
    save_file(tensors, str(weights(inputs[2])))
    with pytest.raises(InvalidAdapter) as caught:
        merge_adapters(inputs, tmp_path / "out", MergeRequest(rank=4), device="cpu",
                       workers=2)
    assert caught.value.code == "non_finite" and key in caught.value.message
    assert not (tmp_path / "out").exists() and staging_left(tmp_path) == []
    assert helper_threads() == []


def test_modules_go_two_at_once_on_the_cpu_for_factor_sized_methods(
        inputs: list[Path]) -> None:
    from lorafold.merge.executor import default_workers, execute_merge
    from lorafold.merge.plan import plan_merge
    from lorafold.merge.threads import torch_threads

    cpu = torch.device("cpu")
    with contextlib.ExitStack() as stack:
        adapters = [stack.enter_context(open_adapter(p)) for p in inputs]
        ctm = plan_merge(adapters, MergeRequest(rank=4))
        mtc = plan_merge(adapters, MergeRequest(rank=4, method="mtc"))
        with torch_threads(2):
            assert default_workers(ctm, cpu) == 2
            assert default_workers(mtc, cpu) == 1            # dense m×n work per module
            assert default_workers(ctm, torch.device("cuda")) == 1
        with torch_threads(1):
            assert default_workers(ctm, cpu) == 1
        handed: list[str] = []                               # the sink sees plan order
        execute_merge(ctm, adapters, device=cpu, workers=2,
                      sink=lambda merged: handed.append(merged.spec.name))
        assert handed == [m.spec.name for m in ctm.modules]
        with pytest.raises(ValueError, match="CPU only"):
            execute_merge(ctm, adapters, device=torch.device("cuda"), workers=2)
