"""`unlearn(...)`: data-driven unlearning of one LoRA adapter against its base model.

Output decision:
- gradient_ascent, grad_diff, ihl, npo, simnpo keep training the original LoRA factors, so
  the output has the original's config and rank exactly; nothing is approximated.
- feature_alignment trains a separate residual adapter (the method's point: the original
  stays intact while training) and writes original + residual as one adapter, exactly at
  rank r_original + r_residual by default, or compressed to a smaller `output_rank`
  (lossy; see lorafold.unlearn.consolidation).

Every stopping check measures the model that will be written, and the "after" metrics are
measured on the written adapter itself. Metrics (lorafold.unlearn.metrics) include the
reference attack, whose yardstick (the base model alone) is measured once, before training.
Optional robustness probes (relearning, quantization) run last, on the written adapter.

The output is built in a staging directory beside `out_dir` and moved into place only
when complete, so a failed or cancelled job leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import functools
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
from lorafold.unlearn.consolidation import consolidate, consolidation_request, written_view
from lorafold.unlearn.datasets import TextDataset, encode, pad_id_of
from lorafold.unlearn.hyperparams import Hyperparams
from lorafold.unlearn.metrics import SetMetrics, evaluate, measure_sets
from lorafold.unlearn.model import ORIGINAL, UnlearnModel
from lorafold.unlearn.objectives import MethodSpec, get_method, resolve_hyperparams
from lorafold.unlearn.probes import run_probes
from lorafold.unlearn.trainer import train

logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
Checkpoint = Callable[[], None]

# Share of the whole job each stage covers, for a progress fraction that only grows.
_STAGES = {"load": (0.0, 0.05), "evaluate_before": (0.05, 0.1), "train": (0.1, 0.85),
           "write": (0.85, 0.9), "evaluate_after": (0.9, 0.95), "probe": (0.95, 1.0),
           "publish": (1.0, 1.0)}


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
    present = {k: v for k, v in sets.items() if v is not None}
    report = _Reporter(progress, checkpoint)
    compute_device = resolve_device(device)
    report("load")
    model: UnlearnModel | None = None
    with open_adapter(adapter_dir, label="original") as original:
        staging = staging_dir(out_dir)
        try:
            base, tokenizer = load_base_model(base_model_dir, device=compute_device)
            check_adapter_fits(base, original)
            model = UnlearnModel(base, original.directory,
                                 train_original=spec.trains == "original")
            del base
            job = _Job(model, tokenizer, spec, hp, original, present, staging, compute_device)
            metrics = job.run(report=report, checkpoint=checkpoint)
            metrics["wall_time_s"] = round(time.perf_counter() - started, 3)
            lineage = _lineage(spec=spec, hp=hp, original=original, datasets=sets,
                               metrics=metrics)
            attach_lineage(staging / "adapter", {**lineage, **(lineage_extra or {})})
            report("publish")
            publish_directory(staging / "adapter", out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if model is not None:
                model.close()
            gc.collect()
            release_device_memory(compute_device)
    logger.info("%s: wrote %s in %.1fs (%d steps)", spec.name, out_dir, metrics["wall_time_s"],
                metrics["steps"])
    return UnlearnResult(out_dir=out_dir.resolve(), metrics=metrics)


@dataclasses.dataclass
class _Job:
    """One loaded unlearning run: measure, train, write into staging/'adapter', re-measure."""

    model: UnlearnModel
    tokenizer: Any
    spec: MethodSpec
    hp: Hyperparams
    original: LoraAdapter
    sets: Mapping[str, TextDataset]
    staging: Path
    device: torch.device

    def evaluate(self, reference: Mapping[str, SetMetrics] | None) -> dict[str, Any]:
        return evaluate(self.model.peft, self.tokenizer, self.sets, max_length=self.hp.max_length,
                        reference=reference)

    def run(self, *, report: _Reporter, checkpoint: Checkpoint | None) -> dict[str, Any]:
        model, spec, hp = self.model, self.spec, self.hp
        rank = max(m.rank for m in self.original.modules.values())
        encoded = {k: encode(self.tokenizer, v, max_length=hp.max_length)
                   for k, v in self.sets.items()}
        report("evaluate_before")
        with model.view("base"):  # the reference attack's yardstick, measured once
            reference = measure_sets(model.peft, self.tokenizer, self.sets,
                                     max_length=hp.max_length)
        before = self.evaluate(reference)
        logger.info("%s: before %s", spec.name, before)
        request, output_view = None, None
        if spec.trains == "residual":
            residual_rank = hp.residual_rank or rank
            model.add_residual(rank=residual_rank, seed=hp.seed,
                               target_modules=[model_path(n) for n in self.original.modules])
            request = consolidation_request(self.original, hp, residual_rank)
            if request.method != "cat":  # lossy: stop on what will be written
                output_view = functools.partial(written_view, model, self.original, request,
                                                scratch_root=self.staging, device=self.device)
        outcome = train(model, spec, hp, forget=encoded["forget"], retain=encoded.get("retain"),
                        holdout=encoded.get("holdout"), pad_id=pad_id_of(self.tokenizer),
                        on_step=lambda s: report("train", s / hp.max_steps, check=False),
                        checkpoint=checkpoint, output_view=output_view)
        metrics: dict[str, Any] = {
            "method": spec.name, "before": before, "after": {}, "steps": outcome.steps,
            "max_steps": hp.max_steps, "stopped_early": outcome.stopped_early,
            "target_reached": outcome.target_reached, "stopping_checks": outcome.history,
            "original_rank": rank, "output_rank": rank, "device": str(self.device),
            "wall_time_s": 0.0,
        }
        if outcome.delta is not None:
            metrics["delta"] = outcome.delta
        report("write")
        _check_finite(model)
        target = self.staging / "adapter"
        if request is None:
            model.save_adapter(ORIGINAL, target, dtype=self.original.dtype)
        else:
            if output_view is not None:  # the stacked model, before a lossy consolidation
                metrics["before_consolidation"] = self.evaluate(reference)
            consolidation = consolidate(model, self.original, request, target,
                                        device=self.device)
            metrics["consolidation"] = consolidation
            metrics["output_rank"] = consolidation["output_rank"]
        report("evaluate_after")
        model.load_output(target)
        metrics["after"] = self.evaluate(reference)
        logger.info("%s: after %s", spec.name, metrics["after"])
        if hp.relearn_probe_steps or hp.quantization_probe:
            report("probe")
            metrics["probes"] = run_probes(model.peft, self.tokenizer, self.sets, hp)
        return metrics
