"""Run a merge plan module by module, with reading and writing overlapped with compute.

On the CPU, modules are merged two at once (`_side_by_side`, `default_workers`): a pool of
two threads merges, each on half the merge's torch threads, while the caller's thread
reads the next module's factors in plan order (plain reads, the inputs' sha256 on the
way, the NaN/Inf check, the float32 upcast) and hands finished modules to the sink (e.g.
`AdapterWriter.add`) in plan order. The next module is read while both merge and goes to
the first worker that is free; so memory holds three modules' inputs and at most three
outputs.

Otherwise (a GPU, a dense method, a merge on one thread) modules are merged in turn, with
three stages at once where there is a core for each: a reader thread loads the next
module's factors, the caller's thread merges the current module, and a writer thread
hands the previous module's output to the sink. Each stage is at most one module ahead
of the next, so memory is bounded by the inputs of two modules (the one merging, the one
read ahead) plus the outputs of three (one being written, one queued, one just merged):
never the whole model. Without a sink the outputs are returned (and held) instead.

Between modules the executor reports progress and calls the cancellation checkpoint; on
any error or cancellation every thread stops (a module already merging finishes first),
and the caller's writer discards its staging files, so nothing is published.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from lorafold.adapters.reader import LoraAdapter
from lorafold.adapters.tensor_file import all_finite
from lorafold.adapters.writer import MergedModule
from lorafold.errors import NumericalError
from lorafold.merge.factors import StackedFactors, stack_factors
from lorafold.merge.heap import retain_freed_memory
from lorafold.merge.methods import Factors, MethodInput, MethodOutput
from lorafold.merge.pipeline import Prefetch, WriteBehind
from lorafold.merge.plan import MergePlan, ModulePlan
from lorafold.merge.report import module_report, subspace_report, subspace_summary, summarize
from lorafold.merge.subspaces import Subspaces
from lorafold.merge.threads import (
    adaptive_threads,
    gil_switch_interval,
    module_ops,
    torch_threads,
)

logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
Checkpoint = Callable[[], None]


@dataclass(frozen=True)
class MergeOutput:
    modules: list[MergedModule]
    report: dict[str, Any]


def module_generator(seed: int, module: str) -> torch.Generator:
    """A CPU generator per module, from the seed and the module's name: a module's random
    draws do not depend on which other modules the merge holds or on their order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module.encode())) % 2**63)


def report_rows(out: MethodOutput, factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                ) -> list[dict[str, float]]:
    """The module's report entries: from the method's subspace view when it has one (k×k
    work), else from the factors."""
    return subspace_report(out.view) if out.view is not None else module_report(
        out.factors, factors)


Sink = Callable[[MergedModule], None]
_NO_TENSOR = torch.empty(0)


@dataclass(frozen=True)
class LoadedInputs:
    """One module's input factors as the reader left them: (s_t·B_t, A_t) in float32
    when `scales` is None (a CPU merge), else (B_t, A_t) as stored, with their s_t."""

    pairs: Factors
    scales: list[float] | None = None


def load_factors(module: ModulePlan, adapters: Sequence[LoraAdapter],
                 device: torch.device) -> LoadedInputs:
    """Read one module's inputs (run by the reader thread). For a CPU merge they come out
    ready, upcast and checked for NaN/Inf (`_refuse_non_finite`); for a GPU they stay as
    stored, so `to_device` moves half the bytes of bf16, and the reader checks them."""
    on_cpu = device.type == "cpu"
    loaded = [adapters[index].load(module.name, check_finite=not on_cpu)
              for index in module.inputs]
    if not on_cpu:
        return LoadedInputs([(f.B, f.A) for f in loaded], [f.scale for f in loaded])
    factors = stack_factors([(f.B, f.A, f.scale) for f in loaded])
    _refuse_non_finite(factors, module, adapters)
    return LoadedInputs(factors)


def _refuse_non_finite(factors: StackedFactors, module: ModulePlan,
                       adapters: Sequence[LoraAdapter]) -> None:
    """The reader's NaN/Inf check, done once on the float32 stacks: a summing pass over
    float32 ran 2–3× faster here than over the stored bf16 tensors (a 70B-shaped merge:
    0.13 against 0.35 s). Where a stack is not finite, the inputs are loaded again with the
    reader's own check, which names the tensor (`non_finite`); finite inputs whose scaled
    copy overflowed go on, to the merge's own NaN/Inf check on its result."""
    if all_finite(factors.b) and all_finite(factors.a):
        return
    for index in module.inputs:
        adapters[index].load(module.name)


def to_device(inputs: LoadedInputs, device: torch.device) -> Factors:
    """The methods' input factors on the compute device, upcast and scaled."""
    if inputs.scales is None:
        return inputs.pairs
    return stack_factors([(b, a, scale) for (b, a), scale
                          in zip(inputs.pairs, inputs.scales, strict=True)], device)


def _merge_module(plan: MergePlan, module: ModulePlan, factors: Factors,
                  device: torch.device) -> tuple[MergedModule, dict[str, dict[str, float]],
                                                 Subspaces | None]:
    weights = torch.tensor([plan.weights[i] for i in module.inputs], dtype=torch.float64,
                           device=device)
    generator = module_generator(plan.request.seed, module.name)

    def rule(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return plan.rule.fn(stack, w, plan.rule_params, generator)

    out = plan.method.fn(MethodInput(
        factors=factors, weights=weights, rank=plan.rank, rule=rule,
        flat_spectrum=plan.rule.flat_spectrum, beta=plan.request.ctm_beta,
        subspace=plan.request.ctm_subspace))
    if not (all_finite(out.b) and all_finite(out.a)):
        raise NumericalError(f"{module.name}: merge produced NaN/Inf; nothing written")
    rows = report_rows(out, factors)
    report = {plan.labels[i]: row for i, row in zip(module.inputs, rows, strict=True)}
    merged = MergedModule(spec=module.spec, B=out.b.to("cpu", torch.float32),
                          A=out.a.to("cpu", torch.float32))
    found = out.subspaces
    if found is not None:  # only its figures are reported: let the device tensors go
        found = dataclasses.replace(found, p=_NO_TENSOR, q=_NO_TENSOR)
    return merged, report, found


def default_read_ahead(device: torch.device) -> int:
    """1 (reader and writer threads) when a core is left over for them, else 0 (read and
    write in turn).

    A CPU merge whose torch threads take every core gains nothing from helper threads and
    loses to them: they take a core from the merge's OpenMP team, whose every barrier then
    waits (measured on 2 cores, 32 Llama-7B layers: a reader thread made the merge 1.1–1.35×
    slower end to end). A GPU merge, or a worker given fewer threads than cores, leaves
    one free.
    """
    if device.type != "cpu":
        return 1
    return 1 if (os.cpu_count() or 1) > torch.get_num_threads() else 0


# Modules merged at once on the CPU, the merge's threads split between them. With one
# module read ahead for whichever is free first, a merge holds three modules' inputs (one
# at a time: two) and three outputs.
MODULE_WORKERS = 2
# Python's thread switch interval while they run. The two workers and the reading thread
# hand the GIL back and forth between small torch ops; at the default 5 ms, 32 Llama-7B
# layers took 2.74–2.85 s with two workers (2.71–2.92 s one module at a time); at 0.5–2 ms
# 2.11–2.39 s (2 cores, one run each, alternating).
GIL_SWITCH_S = 0.0005


def default_workers(plan: MergePlan, device: torch.device) -> int:
    """How many modules to merge at once: `MODULE_WORKERS` on the CPU where the merge has
    that many torch threads (in the service, cores ÷ workers), else 1.

    Most of a module's CtM time at R = 128 is small ops (r×r and R×r work, LAPACK on
    128×128) that run no faster on two threads than on one. Two modules side by side, one
    torch thread each, keep both cores busy with no OpenMP barrier between them, so they
    also hold up beside a busy process, where a barrier waits out the other's time slice.
    Measured on 2 cores, 32 Llama-7B layers, fresh processes alternating: idle 2.43 s
    against 2.70 s one module at a time (medians of 6); beside one busy process 3.25–4.04 s
    against 5.38–5.68 s (3 each); the 70B-shaped set 8.0–8.7 s against 8.4–10.7 s. Not for
    a dense method (mtc), whose per-module memory is m×n stacks, nor on a GPU, which runs
    one module's kernels at a time anyway."""
    if device.type != "cpu" or plan.method.dense:
        return 1
    return max(1, min(MODULE_WORKERS, torch.get_num_threads()))


Merged = tuple[MergedModule, dict[str, dict[str, float]], Subspaces | None]
Merging = Generator[tuple[ModulePlan, Merged], None, None]


def _one_at_a_time(plan: MergePlan, reader: Iterable[LoadedInputs], device: torch.device,
                   checkpoint: Checkpoint | None) -> Merging:
    """Each module merged in turn, on the threads `module_ops` chooses."""
    for module, loaded in zip(plan.modules, reader, strict=True):
        if checkpoint is not None:
            checkpoint()
        with module_ops():
            merged = _merge_module(plan, module, to_device(loaded, device), device)
        del loaded
        yield module, merged


def _side_by_side(plan: MergePlan, adapters: Sequence[LoraAdapter], device: torch.device,
                  workers: int, checkpoint: Checkpoint | None) -> Merging:
    """Up to `workers` modules merging at once in a thread pool, the merge's threads split
    between them; read here, in plan order (file order, so the inputs' digests still come
    from the same reads), and handed back in plan order. One module more than `workers` is
    read ahead, so a worker that finishes starts the next at once instead of waiting for
    this thread to read it (2 workers, 32 Llama-7B layers: 2.46 against 2.59 s, medians of
    12 alternating): `workers` + 1 modules' inputs are held."""
    window: collections.deque[tuple[ModulePlan, Future[Merged]]] = collections.deque()
    threads = max(1, torch.get_num_threads() // workers)
    with torch_threads(threads), gil_switch_interval(GIL_SWITCH_S), ThreadPoolExecutor(
            workers, thread_name_prefix="merge-worker") as pool:
        try:
            for module in plan.modules:
                if len(window) > workers:
                    oldest, running = window.popleft()
                    yield oldest, running.result()
                if checkpoint is not None:
                    checkpoint()
                loaded = load_factors(module, adapters, device)
                window.append((module, pool.submit(_merge_module, plan, module,
                                                   to_device(loaded, device), device)))
                del loaded
            while window:
                oldest, running = window.popleft()
                yield oldest, running.result()
        finally:                    # stopped early: drop what has not started, wait for the rest
            for _, running in window:
                running.cancel()


def _read_in_turn(modules: Sequence[ModulePlan], adapters: Sequence[LoraAdapter],
                  device: torch.device) -> Iterator[LoadedInputs]:
    for module in modules:
        yield load_factors(module, adapters, device)


class _InTurn:
    """`WriteBehind`'s calls, done at once in the caller's thread."""

    def __init__(self, consume: Sink) -> None:
        self.put = consume

    def finish(self) -> None:
        pass


def execute_merge(plan: MergePlan, adapters: Sequence[LoraAdapter], *, device: torch.device,
                  progress: Progress | None = None, checkpoint: Checkpoint | None = None,
                  sink: Sink | None = None, read_ahead: int | None = None,
                  workers: int | None = None) -> MergeOutput:
    """Merge every module of `plan`; outputs go to `sink` (in plan order) or, without
    one, into the result.

    `workers`: modules merged at once (`_side_by_side`; CPU only), read and written in the
    caller's thread; None: `default_workers`, or 1 where `read_ahead` is given. With one,
    modules are merged in turn, and `read_ahead` is how many modules a reader thread may
    be ahead (memory: one module's inputs each); 0 reads each module in turn (and writes
    without a writer thread); None: `default_read_ahead`."""
    if workers is None:
        workers = default_workers(plan, device) if read_ahead is None else 1
    if workers > 1 and device.type != "cpu":
        raise ValueError("modules are merged side by side on the CPU only")
    if read_ahead is None:
        read_ahead = 0 if workers > 1 else default_read_ahead(device)
    kept: list[MergedModule] = []
    per_module: dict[str, dict[str, dict[str, float]]] = {}
    subspaces: dict[str, Subspaces] = {}
    total = len(plan.modules)
    retain_freed_memory()
    with contextlib.ExitStack() as stack:
        if device.type == "cpu" and workers == 1:
            stack.enter_context(adaptive_threads())
        consume = sink if sink is not None else kept.append
        writer: WriteBehind[MergedModule] | _InTurn = _InTurn(consume) if read_ahead == 0 \
            else stack.enter_context(WriteBehind(consume, name="merge-writer"))
        merged: Merging
        if workers > 1:
            merged = _side_by_side(plan, adapters, device, workers, checkpoint)
        else:
            reader: Iterable[LoadedInputs] = _read_in_turn(plan.modules, adapters, device) \
                if read_ahead == 0 else stack.enter_context(Prefetch(
                    plan.modules, lambda m: load_factors(m, adapters, device),
                    depth=read_ahead, name="merge-reader"))
            merged = _one_at_a_time(plan, reader, device, checkpoint)
        for done, (module, (result, rows, found)) in enumerate(
                stack.enter_context(contextlib.closing(merged))):
            writer.put(result)
            per_module[module.name] = rows
            if found is not None:
                subspaces[module.name] = found
            if progress is not None:
                progress("merge", (done + 1) / total)
        writer.finish()
    report = summarize(per_module, plan.labels)
    if subspaces:
        report["subspaces"] = subspace_summary(subspaces)
    return MergeOutput(modules=kept, report=report)
