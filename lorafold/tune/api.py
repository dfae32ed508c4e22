"""`tune_merge`: a merge whose parameters are chosen on validation data, then written.

Steps: check everything checkable (request, tuning, data) → open the inputs and plan the
merge → load the base model once and check that every input fits it → score candidates
from one `CandidateSpace` (coarse-to-fine grids, `lorafold.tune.search`) → optionally learn
per-input weights → write the best with `merge_adapters`, so the output, its lineage and a
later `remove` (which re-merges from lineage) are those of a plain merge at the chosen
values. The tuning summary (candidates, wall time, validation curve, chosen values) goes
into the lineage and the returned report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafold.adapters.reader import LoraAdapter, ModuleSpec, open_adapter
from lorafold.device import release_device_memory, resolve_device
from lorafold.errors import InvalidRequest
from lorafold.merge.api import AdapterInput, MergeResult, merge_adapters
from lorafold.merge.plan import MergeRequest, check_request, plan_merge
from lorafold.tune.candidates import CandidateSpace
from lorafold.tune.evaluation import Score, ValidationSets
from lorafold.tune.options import TuneRequest, check_tune_request, resolve_params
from lorafold.tune.patch import Delta, fixed_delta, patched
from lorafold.tune.search import Dimension, Evaluation, coordinate_search
from lorafold.tune.weights import learn_weights
from lorafold.unlearn.base_models import check_adapter_fits, load_base_model
from lorafold.unlearn.datasets import TextDataset

logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
Checkpoint = Callable[[], None]

# The coarse grids and the boxes refinement stays in. λ's grid holds 1 (the untuned merge).
DIMENSIONS: dict[str, Dimension] = {d.name: d for d in (
    Dimension("lambda", (0.25, 0.5, 0.75, 1.0, 1.5, 2.0), 0.0, 4.0),
    Dimension("beta", (0.0, 0.25, 0.5, 0.75, 1.0), 0.0, 1.0),
    Dimension("density", (0.2, 0.4, 0.6, 0.8, 1.0), 0.05, 1.0),
    Dimension("drop", (0.1, 0.3, 0.5), 0.0, 0.9),
)}

# Share of the whole run each stage covers, for a progress fraction that only grows.
STAGES = {"load": (0.0, 0.1), "tune": (0.1, 0.85), "weights": (0.1, 0.85),
          "merge": (0.85, 0.95), "evaluate": (0.95, 1.0)}


@dataclasses.dataclass(frozen=True)
class TunedMerge:
    result: MergeResult          # the written merge; its report carries "tuning"
    request: MergeRequest        # the request at the chosen values (what lineage records)
    tuning: dict[str, Any]


class _Reporter:
    def __init__(self, progress: Progress | None, checkpoint: Checkpoint | None) -> None:
        self.progress, self.checkpoint = progress, checkpoint

    def __call__(self, stage: str, within: float, *, check: bool = True) -> None:
        if check and self.checkpoint is not None:
            self.checkpoint()
        if self.progress is not None:
            start, end = STAGES[stage]
            self.progress(stage, start + (end - start) * min(max(within, 0.0), 1.0))


def start_point(request: MergeRequest, params: Sequence[str],
                rule_density: float, rule_drop: float) -> dict[str, float]:
    """The untuned merge's values of the grid parameters (the search starts there)."""
    values = {"lambda": request.scale, "beta": request.ctm_beta, "density": rule_density,
              "drop": rule_drop}
    return {name: float(values[name]) for name in params if name in values}


def chosen_request(request: MergeRequest, point: Mapping[str, float],
                   weights: Sequence[float] | None) -> MergeRequest:
    """The plain merge request at the chosen values."""
    fields: dict[str, Any] = {}
    names = {"lambda": "scale", "beta": "beta", "density": "density", "drop": "drop"}
    for name, value in point.items():
        fields[names[name]] = float(value)
    if weights is not None:
        fields["weights"] = tuple(float(w) for w in weights)
    return dataclasses.replace(request, **fields)


def candidate_deltas(space: CandidateSpace, point: Mapping[str, float],
                     weights: Sequence[float] | None = None) -> dict[str, tuple[ModuleSpec, Delta]]:
    specs = {m.name: m.spec for m in space.plan.modules}
    out: dict[str, tuple[ModuleSpec, Delta]] = {}
    for name, (b, a) in space.merged(point, weights).items():
        out[name] = (specs[name], fixed_delta(specs[name], a, b))
    return out


def score_adapter(model: nn.Module, sets: ValidationSets, adapter: LoraAdapter,
                  device: torch.device) -> Score:
    """Validation of base + a written adapter (read back: what will be served)."""
    deltas: dict[str, tuple[ModuleSpec, Delta]] = {}
    for name, spec in adapter.modules.items():
        loaded = adapter.load(name, device=device)
        b, a = loaded.B.to(torch.float32) * loaded.scale, loaded.A.to(torch.float32)
        deltas[name] = (spec, fixed_delta(spec, a, b))
    with patched(model, deltas):
        return sets.score(model)


def _check_inputs(request: MergeRequest, tune: TuneRequest, n_inputs: int,
                  datasets: Sequence[TextDataset], max_budget: int | None) -> None:
    check_request(request, n_inputs)
    check_tune_request(tune, n_inputs=n_inputs, n_datasets=len(datasets),
                       max_budget=max_budget)
    if request.min_energy is not None:
        raise InvalidRequest("a tuned merge needs an explicit rank (not rank auto)",
                             code="invalid_tune")
    for ds in datasets:
        if not len(ds):
            raise InvalidRequest(f"validation set {ds.name or '(unnamed)'} is empty",
                                 code="empty_dataset")


def tune_merge(inputs: Sequence[AdapterInput], out_dir: Path | str, request: MergeRequest,
               tune: TuneRequest, *, datasets: Sequence[TextDataset], base_model_dir: Path,
               device: str | None = None, progress: Progress | None = None,
               checkpoint: Checkpoint | None = None, max_budget: int | None = None,
               lineage_extra: Mapping[str, Any] | None = None) -> TunedMerge:
    """Search the parameters `tune` names on `datasets`, then write the best merge."""
    started = time.perf_counter()
    deadline = time.monotonic() + tune.time_limit_s
    _check_inputs(request, tune, len(inputs), datasets, max_budget)
    report = _Reporter(progress, checkpoint)
    compute_device = resolve_device(device)
    model: nn.Module | None = None
    with contextlib.ExitStack() as stack:
        adapters = [item if isinstance(item, LoraAdapter)
                    else stack.enter_context(open_adapter(item, label=str(item)))
                    for item in inputs]
        plan = plan_merge(adapters, request)
        params = resolve_params(tune, plan.method.name, plan.rule.name,
                                uses_density=plan.rule.uses_density,
                                uses_drop=plan.rule.uses_drop)
        report("load", 0.0)
        try:
            model, tokenizer = load_base_model(base_model_dir, device=compute_device)
            for adapter in adapters:
                check_adapter_fits(model, adapter)
            sets = ValidationSets.build(tokenizer, datasets, device=compute_device,
                                        max_length=tune.max_length,
                                        batch_size=tune.batch_size)
            space = CandidateSpace(plan, adapters, compute_device)
            report("load", 1.0)
            tuning = _search(model, sets, space, params, tune, deadline, report)
            point = tuning.pop("_point")
            weights = tuning.pop("_weights")
            final = chosen_request(request, point, weights)
            del space
            report("merge", 0.0)
            extra = {**(lineage_extra or {}), "tuning": tuning}
            result = merge_adapters(adapters, out_dir, final, device=device,
                                    checkpoint=checkpoint, lineage_extra=extra)
            report("evaluate", 0.0)
            with open_adapter(result.out_dir) as written:
                after = score_adapter(model, sets, written, compute_device)
        finally:
            model = None
            gc.collect()
            release_device_memory(compute_device)
    tuning["written"] = after.to_dict()
    tuning["wall_time_s"] = round(time.perf_counter() - started, 3)
    report("evaluate", 1.0, check=False)
    logger.info("tuned merge: %d candidates, %d weight steps, loss %.4f -> %.4f in %.1fs",
                tuning["candidates_evaluated"], tuning["weight_steps"],
                tuning["untuned"]["loss"], after.loss, tuning["wall_time_s"])
    result = dataclasses.replace(result, report={**result.report, "tuning": tuning})
    return TunedMerge(result=result, request=final, tuning=tuning)


def _search(model: nn.Module, sets: ValidationSets, space: CandidateSpace,
            params: Sequence[str], tune: TuneRequest, deadline: float,
            report: _Reporter) -> dict[str, Any]:
    """Grid search, then learned weights; the summary with the chosen point inside."""
    plan = space.plan
    grid_params = [p for p in params if p in DIMENSIONS]
    start = start_point(plan.request, grid_params, plan.rule_params.density,
                        plan.rule_params.drop)
    scores: dict[int, Score] = {}
    curve: list[dict[str, Any]] = []
    budget = tune.budget
    learn = "weights" in params
    grid_budget = budget if not learn else max(1, budget // 2) if grid_params else 1

    def score(point: Mapping[str, float]) -> float:
        report("tune", len(scores) / budget)
        with patched(model, candidate_deltas(space, point)):
            found = sets.score(model)
        scores[len(scores)] = found
        return found.loss

    def record(entry: Evaluation) -> None:
        found = scores[entry.index]
        curve.append({"index": entry.index, "stage": entry.stage, "point": entry.point,
                      "loss": found.loss, "accuracy": found.accuracy,
                      "elapsed_s": round(entry.elapsed_s, 3)})

    searched = coordinate_search([DIMENSIONS[p] for p in grid_params], score, start=start,
                                 budget=grid_budget, time_limit_s=max(
                                     0.0, deadline - time.monotonic()),
                                 refine=True, on_evaluation=record)
    untuned_index = 0   # the search scores its start point first
    best_index = min(curve, key=lambda e: (e["loss"], e["index"]))["index"]
    summary: dict[str, Any] = {
        "params": list(params), "budget": budget, "time_limit_s": tune.time_limit_s,
        "seed": plan.request.seed, "candidates_evaluated": len(curve),
        "stopped": searched.stopped, "start": start, "chosen": dict(searched.best),
        "untuned": scores[untuned_index].to_dict(),
        "best": scores[best_index].to_dict(), "curve": curve, "weight_steps": 0,
    }
    weights = None
    if learn:
        scale = searched.best.get("lambda", plan.request.scale)
        beta = searched.best.get("beta", plan.request.ctm_beta)
        views = space.linear_views(beta, plan.weights)
        space.release()  # from here: base model + one adapter's factors + activations
        steps = max(0, budget - len(curve))
        learned = learn_weights(model, sets, views, start=plan.weights, scale=scale,
                                steps=steps, learning_rate=tune.learning_rate,
                                deadline=deadline, checkpoint=report.checkpoint,
                                on_step=lambda s, _loss: report(
                                    "weights", (len(curve) + s) / budget, check=False))
        if learned.steps and learned.loss < summary["best"]["loss"]:
            weights = learned.weights
        summary.update(weight_steps=learned.steps, weights={
            "start": list(plan.weights), "learned": learned.weights,
            "chosen": weights if weights is not None else list(plan.weights),
            "start_loss": learned.start_loss, "loss": learned.loss,
            "curve": learned.curve, "stopped": learned.stopped})
        if weights is not None:
            summary["chosen"]["weights"] = weights
    summary["_point"] = dict(searched.best)
    summary["_weights"] = weights
    if not math.isfinite(summary["best"]["loss"]):
        logger.warning("every candidate scored a non-finite validation loss")
    return summary
