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

from lorafold import __version__
from lorafold.adapters.reader import LoraAdapter, open_adapter
from lorafold.adapters.serving import preflight
from lorafold.adapters.writer import output_config, write_adapter
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


def merge_lineage(adapters: Sequence[LoraAdapter], request: MergeRequest, weights: Sequence[float],
                  labels: Sequence[str], *, rank: int,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to redo this merge: inputs by sha256, weights, parameters."""
    return {
        "format": 1,
        "kind": "merge",
        "lorafold_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "parameters": {**request.parameters(), "output_rank": rank},
        "inputs": [
            {"label": label, "sha256": adapter.sha256, "weight": weight,
             "base_model": adapter.config.base_model_name_or_path}
            for adapter, label, weight in zip(adapters, labels, weights, strict=True)
        ],
        **(extra or {}),
    }


def merge_adapters(inputs: Sequence[AdapterInput], out_dir: Path | str, request: MergeRequest, *,
                   device: str | None = None, progress: Progress | None = None,
                   checkpoint: Checkpoint | None = None,
                   lineage_extra: dict[str, Any] | None = None) -> MergeResult:
    """Open, plan, merge module by module, then write the output adapter atomically.

    Inputs may be opened `LoraAdapter`s (their labels name them in the report) or paths.
    Any error leaves `out_dir` untouched.
    """
    started = time.perf_counter()
    check_request(request, len(inputs))
    compute_device = resolve_device(device)
    with contextlib.ExitStack() as stack:
        adapters = []
        for item in inputs:
            if isinstance(item, LoraAdapter):
                adapters.append(item)
            else:
                adapters.append(stack.enter_context(open_adapter(item, label=str(item))))
        chosen = None
        if request.min_energy is not None:  # rank "auto": one pass over the factors first
            chosen = choose_rank(adapters, request)
            if progress is not None:
                progress("auto_rank", 1.0)
        plan = plan_merge(adapters, request if chosen is None
                          else dataclasses.replace(request, rank=chosen.rank, min_energy=None))
        if progress is not None:
            progress("plan", 1.0)
        try:
            output = execute_merge(plan, adapters, device=compute_device, progress=progress,
                                   checkpoint=checkpoint)
        finally:
            release_device_memory(compute_device)
        lineage = merge_lineage(adapters, request, plan.weights, plan.labels, rank=plan.rank,
                                extra=lineage_extra)
        modules = fill_module_types(output.modules, request.target)
        config = conform_config(output_config([a.config for a in adapters], plan.rank),
                                modules, target=request.target,
                                base_model_name=request.base_model_name)
        if progress is not None:
            progress("write", 0.0)
        report = output.report
        if chosen is not None:
            report = {**report, "auto_rank": rank_summary(chosen)}
        path = write_adapter(Path(out_dir), modules, config=config, lineage=lineage,
                             report=report, dtype=plan.dtype)
    if request.target is not None:  # the output passes its own preflight
        with open_adapter(path) as written:
            report = {**report, "serving": preflight(written, request.target).to_dict()}
    wall = time.perf_counter() - started
    logger.info("merged %d adapters into %s (%s/%s, rank %d) in %.2fs", len(adapters), path,
                request.method, request.rule_name, plan.rank, wall)
    return MergeResult(out_dir=path, report=report, lineage=lineage, wall_time_s=wall)
