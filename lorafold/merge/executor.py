"""Run a merge plan module by module, so memory stays at one module's inputs plus output.

Each module's factors are read lazily, moved to the device, merged and moved back before
the next module is read. Between modules the executor reports progress and calls the
cancellation checkpoint, so a job can stop cleanly; nothing is written here.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorafold.adapters.reader import LoraAdapter
from lorafold.adapters.tensor_file import all_finite
from lorafold.adapters.writer import MergedModule
from lorafold.errors import NumericalError
from lorafold.merge.methods import MethodInput, MethodOutput
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


def _merge_module(plan: MergePlan, module: ModulePlan, adapters: Sequence[LoraAdapter],
                  device: torch.device) -> tuple[MergedModule, dict[str, dict[str, float]],
                                                 Subspaces | None]:
    factors = []
    for index in module.inputs:
        loaded = adapters[index].load(module.name, device=device)
        b = loaded.B.to(torch.float32) * loaded.scale
        factors.append((b, loaded.A.to(torch.float32)))
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
    return merged, report, out.subspaces


def execute_merge(plan: MergePlan, adapters: Sequence[LoraAdapter], *, device: torch.device,
                  progress: Progress | None = None,
                  checkpoint: Checkpoint | None = None) -> MergeOutput:
    merged: list[MergedModule] = []
    per_module: dict[str, dict[str, dict[str, float]]] = {}
    subspaces: dict[str, Subspaces] = {}
    total = len(plan.modules)
    with adaptive_threads() if device.type == "cpu" else contextlib.nullcontext():
        for done, module in enumerate(plan.modules):
            if checkpoint is not None:
                checkpoint()
            with module_ops():
                result, rows, found = _merge_module(plan, module, adapters, device)
            merged.append(result)
            per_module[module.name] = rows
            if found is not None:
                subspaces[module.name] = found
            if progress is not None:
                progress("merge", (done + 1) / total)
    report = summarize(per_module, plan.labels)
    if subspaces:
        report["subspaces"] = subspace_summary(subspaces)
    return MergeOutput(modules=merged, report=report)
