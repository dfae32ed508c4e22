"""Run a merge plan module by module, with reading and writing overlapped with compute.

Three stages run at once (`pipeline`) where there is a core for each: a reader thread
loads the next module's factors
(plain reads, the inputs' sha256 on the way, the NaN/Inf check, the float32 upcast), the
caller's thread merges the current module, and a writer thread hands the previous module's
output to the sink (e.g. `AdapterWriter.add`, which writes it to disk). Each stage is at
most one module ahead of the next, so memory is bounded by the inputs of two modules (the
one merging, the one read ahead) plus the outputs of three (one being written, one queued,
one just merged): never the whole model. Without a sink the outputs are returned (and held) instead.

Between modules the executor reports progress and calls the cancellation checkpoint; on
any error or cancellation both threads stop, and the caller's writer discards its staging
files, so nothing is published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
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
from lorafold.merge.threads import adaptive_threads, module_ops

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
                  sink: Sink | None = None, read_ahead: int | None = None) -> MergeOutput:
    """Merge every module of `plan`; outputs go to `sink` (in plan order) or, without
    one, into the result. `read_ahead`: modules a reader thread may be ahead (memory: one
    module's inputs each); 0 reads each module in turn; None: `default_read_ahead`."""
    if read_ahead is None:
        read_ahead = default_read_ahead(device)
    kept: list[MergedModule] = []
    per_module: dict[str, dict[str, dict[str, float]]] = {}
    subspaces: dict[str, Subspaces] = {}
    total = len(plan.modules)
    retain_freed_memory()
    with contextlib.ExitStack() as stack:
        if device.type == "cpu":
            stack.enter_context(adaptive_threads())
        consume = sink if sink is not None else kept.append
        writer: WriteBehind[MergedModule] | _InTurn = _InTurn(consume) if read_ahead == 0 \
            else stack.enter_context(WriteBehind(consume, name="merge-writer"))
        reader: Iterable[LoadedInputs] = _read_in_turn(plan.modules, adapters, device) \
            if read_ahead == 0 else stack.enter_context(Prefetch(
                plan.modules, lambda m: load_factors(m, adapters, device), depth=read_ahead,
                name="merge-reader"))
        for done, (module, loaded) in enumerate(zip(plan.modules, reader, strict=True)):
            if checkpoint is not None:
                checkpoint()
            with module_ops():
                result, rows, found = _merge_module(plan, module, to_device(loaded, device),
                                                    device)
            del loaded
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
