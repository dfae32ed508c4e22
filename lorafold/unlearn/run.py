"""`unlearn(...)`: data-driven unlearning of one LoRA adapter against its base model.

Output decision (the output is always a PEFT LoRA whose rank does not exceed the
original's):
- gradient_ascent, grad_diff, npo keep training the original LoRA factors, so the output
  has the original's config and rank exactly; nothing is approximated after training.
- feature_alignment trains a separate residual adapter (the method's point: the original
  stays intact while training). The residual is written on its own and consolidated with
  the original by Compress-then-Merge (task arithmetic, weights 1 and 1) at the original's
  rank. That truncation is lossy and, left to singular values alone, drops most of the
  residual: it is a small correction next to the original, yet it is what does the
  forgetting. So the consolidation is *balanced* by default: CtM's β = 0 puts both inputs
  at their mean norm before the shared subspaces are chosen (hyperparameter
  `consolidation_beta`; 1 = inputs as they are). "After" metrics are measured on
  the consolidated adapter (the real output); the stacked model's are reported beside them
  (`before_consolidation`) with the share of each input the output keeps.

The output is built in a staging directory beside `out_dir` and moved into place only
when complete, so a failed or cancelled job leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lorafold import __version__
from lorafold.adapters import LoraAdapter, open_adapter
from lorafold.adapters.config import model_path
from lorafold.adapters.lineage import attach_lineage
from lorafold.adapters.writer import publish_directory, staging_dir
from lorafold.device import release_device_memory, resolve_device
from lorafold.errors import InvalidDataset, InvalidRequest, NumericalError
from lorafold.unlearn.base_models import check_adapter_fits, load_base_model
from lorafold.unlearn.datasets import TextDataset, encode, pad_id_of
from lorafold.unlearn.metrics import evaluate
from lorafold.unlearn.model import ORIGINAL, RESIDUAL, UnlearnModel
from lorafold.unlearn.objectives import Hyperparams, MethodSpec, get_method, resolve_hyperparams
from lorafold.unlearn.trainer import train

logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
Checkpoint = Callable[[], None]

# Share of the whole job each stage covers, for a progress fraction that only grows.
_STAGES = {"load": (0.0, 0.05), "evaluate_before": (0.05, 0.1), "train": (0.1, 0.85),
           "write": (0.85, 0.9), "evaluate_after": (0.9, 1.0)}


@dataclasses.dataclass(frozen=True)
class UnlearnResult:
    out_dir: Path
    metrics: dict[str, Any]


class _Reporter:
    """Maps (stage, fraction within stage) to the job's overall fraction.

    Cancellation is checked at every stage boundary; within training the trainer checks it
    before each step, so per-step progress does not check it a second time.
    """

    def __init__(self, progress: Progress | None, checkpoint: Checkpoint | None) -> None:
        self._progress = progress
        self._checkpoint = checkpoint

    def __call__(self, stage: str, within: float = 0.0, *, check: bool = True) -> None:
        if check and self._checkpoint is not None:
            self._checkpoint()
        if self._progress is not None:
            start, end = _STAGES[stage]
            self._progress(stage, start + (end - start) * min(max(within, 0.0), 1.0))


def _present(ds: TextDataset | None) -> TextDataset | None:
    return ds if ds is not None and len(ds) else None


def check_unlearn_request(*, method: str, forget: TextDataset | None,
                          retain: TextDataset | None,
                          hyperparams: Hyperparams | Mapping[str, Any] | None = None
                          ) -> tuple[MethodSpec, Hyperparams]:
    """Everything that can be refused before a model is loaded."""
    spec = get_method(method)
    hp = resolve_hyperparams(method, hyperparams)
    if forget is None or not len(forget):
        raise InvalidDataset("the forget set is empty", code="empty_dataset")
    if spec.needs_retain and _present(retain) is None:
        raise InvalidRequest(f"method {method} needs a non-empty retain set",
                             code="retain_set_required")
    return spec, hp


def _lineage(*, spec: MethodSpec, hp: Hyperparams, original: LoraAdapter,
             datasets: Mapping[str, TextDataset | None],
             metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format": 1,
        "kind": "unlearn",
        "lorafold_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "method": spec.name,
        "parameters": dataclasses.asdict(hp),
        "parents": [{"label": original.label, "sha256": original.sha256,
                     "base_model": original.config.base_model_name_or_path}],
        "datasets": {name: {"examples": len(ds), "sha256": ds.fingerprint()}
                     for name, ds in datasets.items() if ds is not None},
        "metrics": dict(metrics),
    }


def _check_finite(model: UnlearnModel) -> None:
    for param in model.trainable_parameters():
        if not bool(torch.isfinite(param).all()):
            raise NumericalError("unlearning produced NaN/Inf adapter weights; nothing written")


def _write_output(model: UnlearnModel, spec: MethodSpec, original: LoraAdapter, *,
                  rank: int, beta: float, staging: Path, device: torch.device
                  ) -> tuple[int, dict[str, Any] | None]:
    """Write the output adapter into staging/'adapter'; its rank and consolidation record."""
    _check_finite(model)
    target = staging / "adapter"
    if spec.trains == "original":
        model.save_adapter(ORIGINAL, target, dtype=original.dtype)
        return rank, None
    from lorafold.merge import MergeRequest, merge_adapters

    residual = model.save_adapter(RESIDUAL, staging / "residual")
    request = MergeRequest(method="ctm", rule="ta", rank=rank, weights=(1.0, 1.0), beta=beta)
    result = merge_adapters([original, residual], target, request, device=str(device))
    shutil.rmtree(residual, ignore_errors=True)
    with open_adapter(result.out_dir) as written:
        out_rank = max(m.rank for m in written.modules.values())
    kept = [{**entry, "input": role} for role, entry
            in zip(("original", "residual"), result.report.get("inputs", []), strict=False)]
    return out_rank, {**request.parameters(), "weights": [1.0, 1.0], "inputs": kept}


def unlearn(*, base_model_dir: Path, adapter_dir: Path, forget: TextDataset,
            retain: TextDataset | None, holdout: TextDataset | None, method: str, out_dir: Path,
            hyperparams: Hyperparams | Mapping[str, Any] | None = None,
            device: str | None = None, progress: Progress | None = None,
            checkpoint: Checkpoint | None = None,
            lineage_extra: Mapping[str, Any] | None = None) -> UnlearnResult:
    """Unlearn `forget` from the adapter at `adapter_dir`; write the new adapter to `out_dir`.

    `progress(stage, fraction)` receives the overall job fraction (0..1, non-decreasing);
    `checkpoint()` is called between stages and before every step and may raise JobCancelled.
    `lineage_extra` (e.g. the service's adapter and job ids) is added to the lineage record.
    """
    started = time.perf_counter()
    spec, hp = check_unlearn_request(method=method, forget=forget, retain=retain,
                                     hyperparams=hyperparams)
    sets = {"forget": forget, "retain": _present(retain), "holdout": _present(holdout)}
    report = _Reporter(progress, checkpoint)
    compute_device = resolve_device(device)
    report("load")
    model: UnlearnModel | None = None
    with open_adapter(adapter_dir, label="original") as original:
        try:
            base, tokenizer = load_base_model(base_model_dir, device=compute_device)
            check_adapter_fits(base, original)
            model = UnlearnModel(base, original.directory,
                                 train_original=spec.trains == "original")
            del base
            present = {k: v for k, v in sets.items() if v is not None}
            metrics = _unlearn_loaded(model, tokenizer, spec, hp, original, present,
                                      report=report, checkpoint=checkpoint,
                                      device=compute_device)
            metrics["wall_time_s"] = round(time.perf_counter() - started, 3)
            staging = staging_dir(out_dir)
            try:
                out_rank, consolidation = _write_output(
                    model, spec, original, rank=metrics["original_rank"],
                    beta=hp.consolidation_beta, staging=staging, device=compute_device)
                metrics["output_rank"] = out_rank
                if consolidation is not None:
                    metrics["consolidation"] = consolidation
                report("evaluate_after")
                model.load_output(staging / "adapter")
                metrics["after"] = evaluate(model.peft, tokenizer, present,
                                            max_length=hp.max_length)
                logger.info("%s: after %s", spec.name, metrics["after"])
                metrics["wall_time_s"] = round(time.perf_counter() - started, 3)
                lineage = _lineage(spec=spec, hp=hp, original=original, datasets=sets,
                                   metrics=metrics)
                attach_lineage(staging / "adapter", {**lineage, **(lineage_extra or {})})
                report("evaluate_after", 1.0)
                publish_directory(staging / "adapter", out_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            if model is not None:
                model.close()
            gc.collect()
            release_device_memory(compute_device)
    logger.info("%s: wrote %s in %.1fs (%d steps)", spec.name, out_dir, metrics["wall_time_s"],
                metrics["steps"])
    return UnlearnResult(out_dir=out_dir.resolve(), metrics=metrics)


def _unlearn_loaded(model: UnlearnModel, tokenizer: Any, spec: MethodSpec, hp: Hyperparams,
                    original: LoraAdapter, sets: Mapping[str, TextDataset], *,
                    report: _Reporter, checkpoint: Checkpoint | None,
                    device: torch.device) -> dict[str, Any]:
    """Measure, train; the metrics so far ("after" is filled once the output is written)."""
    rank = max(m.rank for m in original.modules.values())
    encoded = {k: encode(tokenizer, v, max_length=hp.max_length) for k, v in sets.items()}
    report("evaluate_before")
    before = evaluate(model.peft, tokenizer, sets, max_length=hp.max_length)
    logger.info("%s: before %s", spec.name, before)
    if spec.trains == "residual":
        model.add_residual(rank=hp.residual_rank or rank, seed=hp.seed,
                           target_modules=[model_path(n) for n in original.modules])
    outcome = train(model, spec, hp, forget=encoded["forget"], retain=encoded.get("retain"),
                    holdout=encoded.get("holdout"), pad_id=pad_id_of(tokenizer),
                    on_step=lambda s: report("train", s / hp.max_steps, check=False),
                    checkpoint=checkpoint)
    metrics: dict[str, Any] = {
        "method": spec.name,
        "before": before,
        "after": {},
        "steps": outcome.steps,
        "max_steps": hp.max_steps,
        "stopped_early": outcome.stopped_early,
        "target_reached": outcome.target_reached,
        "stopping_checks": outcome.history,
        "original_rank": rank,
        "output_rank": rank,
        "device": str(device),
        "wall_time_s": 0.0,
    }
    if spec.trains == "residual":  # the stacked model, before consolidation to rank r
        metrics["before_consolidation"] = evaluate(model.peft, tokenizer, sets,
                                                   max_length=hp.max_length)
    report("write")
    return metrics
