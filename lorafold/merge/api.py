"""`merge_adapters`: the one call the CLI, the workers and unlearning use to merge."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lorafold import __version__
from lorafold.adapters.reader import LoraAdapter, open_adapter
from lorafold.adapters.serving import preflight
from lorafold.adapters.writer import AdapterWriter, MergedModule, header_reserve, output_config
from lorafold.device import release_device_memory, resolve_device
from lorafold.merge.auto_rank import choose_rank, rank_summary
from lorafold.merge.conform import conform_config, fill_module_types
from lorafold.merge.executor import Checkpoint, Progress, execute_merge
from lorafold.merge.plan import MergeRequest, check_request, plan_merge

logger = logging.getLogger(__name__)

AdapterInput = LoraAdapter | Path | str


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    report: dict[str, Any]
    lineage: dict[str, Any]
    wall_time_s: float


PLACEHOLDER_SHA256 = "0" * 64   # as long as a real one: sizes the header before hashing ends


def merge_lineage(adapters: Sequence[LoraAdapter], request: MergeRequest, weights: Sequence[float],
                  labels: Sequence[str], *, rank: int, extra: dict[str, Any] | None = None,
                  created_at: str | None = None,
                  digests: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything needed to redo this merge: inputs by sha256, weights, parameters.

    `digests` stand in for the inputs' sha256 (a draft, before they are all read)."""
    shas = [a.sha256 for a in adapters] if digests is None else list(digests)
    return {
        "format": 1,
        "kind": "merge",
        "lorafold_version": __version__,
        "created_at": created_at or datetime.now(timezone.utc).isoformat(),
        "parameters": {**request.parameters(), "output_rank": rank},
        "inputs": [
            {"label": label, "sha256": sha, "weight": weight,
             "base_model": adapter.config.base_model_name_or_path}
            for adapter, label, weight, sha in zip(adapters, labels, weights, shas, strict=True)
        ],
        **(extra or {}),
    }


def _open_all(inputs: Sequence[AdapterInput], stack: contextlib.ExitStack) -> list[LoraAdapter]:
    return [item if isinstance(item, LoraAdapter)
            else stack.enter_context(open_adapter(item, label=str(item))) for item in inputs]


def merge_adapters(inputs: Sequence[AdapterInput], out_dir: Path | str, request: MergeRequest, *,
                   device: str | None = None, progress: Progress | None = None,
                   checkpoint: Checkpoint | None = None,
                   lineage_extra: dict[str, Any] | None = None,
                   read_ahead: int | None = None, workers: int | None = None) -> MergeResult:
    """Open, plan, merge module by module into a streaming writer, then publish the output
    adapter atomically.

    Inputs may be opened `LoraAdapter`s (their labels name them in the report) or paths.
    Any error leaves `out_dir` untouched. `read_ahead`, `workers`: see `execute_merge`.
    """
    started = time.perf_counter()
    check_request(request, len(inputs))
    compute_device = resolve_device(device)
    with contextlib.ExitStack() as stack:
        adapters = _open_all(inputs, stack)
        chosen = None
        if request.min_energy is not None:  # rank "auto": one pass over the factors first
            chosen = choose_rank(adapters, request)
            if progress is not None:
                progress("auto_rank", 1.0)
        plan = plan_merge(adapters, request if chosen is None
                          else dataclasses.replace(request, rank=chosen.rank, min_energy=None))
        if progress is not None:
            progress("plan", 1.0)
        created_at = datetime.now(timezone.utc).isoformat()

        def lineage(digests: Sequence[str] | None = None) -> dict[str, Any]:
            return merge_lineage(adapters, request, plan.weights, plan.labels, rank=plan.rank,
                                 extra=lineage_extra, created_at=created_at, digests=digests)

        draft = lineage([PLACEHOLDER_SHA256] * len(adapters))
        writer = stack.enter_context(AdapterWriter(
            Path(out_dir), rank=plan.rank, dtype=plan.dtype,
            reserve=header_reserve((m.spec for m in plan.modules), plan.rank, plan.dtype,
                                   draft)))
        try:
            output = execute_merge(plan, adapters, device=compute_device, progress=progress,
                                   checkpoint=checkpoint, sink=writer.add,
                                   read_ahead=read_ahead, workers=workers)
        finally:
            release_device_memory(compute_device)
        written = [MergedModule(spec, torch.empty(0, plan.rank, device="meta"),
                                torch.empty(plan.rank, 0, device="meta"))
                   for spec in writer.written]          # shapes only, for the conform step
        modules = fill_module_types(written, request.target)
        for filler in modules[len(written):]:           # zero factors a target needs
            writer.add(filler)
        config = conform_config(output_config([a.config for a in adapters], plan.rank),
                                modules, target=request.target,
                                base_model_name=request.base_model_name)
        if progress is not None:
            progress("write", 0.0)
        report = output.report
        if chosen is not None:
            report = {**report, "auto_rank": rank_summary(chosen)}
        final = lineage()          # the inputs' true sha256, known by now
        path = writer.finish(config=config, lineage=final, report=report)
    if request.target is not None:  # the output passes its own preflight
        with open_adapter(path) as written_adapter:
            report = {**report, "serving": preflight(written_adapter, request.target).to_dict()}
    wall = time.perf_counter() - started
    logger.info("merged %d adapters into %s (%s/%s, rank %d) in %.2fs", len(adapters), path,
                request.method, request.rule_name, plan.rank, wall)
    return MergeResult(out_dir=path, report=report, lineage=final, wall_time_s=wall)
