"""Unlearning quality: every method against the gold of retraining without the forget set.

World (bench/unlearn_world.py): a tiny Llama pretrained on facts about other entities;
100 fictitious entities with 4 facts each (each fact with 3 wrong answers); forget = 10%
of the entities, holdout = 20% never trained, split into a stopping half (handed to the
methods' stop rule) and an evaluation half (the membership attacks' non-members);
retain = the rest. Per seed:

- original: a LoRA trained on forget + retain (linearly decaying learning rate);
- gold: a LoRA trained the same way on retain only (what unlearning should reach),
  checked: its retain accuracy must be >= GOLD_RETAIN_MIN;
- every method of `lorafold.unlearn` run on that seed's original, with the forget,
  retain and stopping-holdout sets;
- sequential: three forget requests in a row (the forget entities in thirds), for
  `sequential_methods`;
- adapter dropped: the base model alone (one row, no seed).

Each row is scored the same way (lorafold.unlearn.metrics on forget, retain and the
evaluation holdout): forget NLL and token accuracy, retain accuracy, |MIA AUC − gold AUC|
(loss attack), the two-sample KS p-value of the row's per-example forget NLLs against each
gold seed's and the same on TOFU's truth ratio (its "forget quality"), greedy exact match
and extraction strength, Min-K% / zlib / reference (base model) attack AUCs, and MUSE's
PrivLeak against the gold's Min-K% AUC; wall time; mean ± sd over seeds. The gold band
(`BAND`) is checked per seed.

Hyperparameters never look at the gold: each method runs with the library's defaults, the
run's seed, and the library's gold-free stopping rule (stop when forget NLL reaches holdout
NLL).

    .venv/bin/python bench/unlearn_quality.py            # full run, ~5 min on 2 cores
    .venv/bin/python bench/unlearn_quality.py --quick    # tiny world, ~40 s, nothing written
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from machine import command_line, machine_info, write_json
from scipy.stats import ks_2samp
from unlearn_world import World, WorldSpec, build_world, load_base, train_adapter

from lorafold.merge.threads import torch_threads
from lorafold.unlearn import METHODS, Hyperparams, TextDataset, resolve_hyperparams, unlearn
from lorafold.unlearn.metrics import SetMetrics, measure_sets, summarize

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "unlearn_quality.json"
HYPERPARAMETER_RULE = (
    "library defaults per method (lorafold.unlearn.objectives.METHODS), the run's seed, and "
    "the library's gold-free stopping rule: stop as soon as forget-set NLL >= holdout-set "
    "NLL (stopping half of the holdout; checked every eval_every steps) or at max_steps. "
    "Nothing is tuned; the gold is never consulted.")
METRIC_KEYS = ("forget_nll", "forget_accuracy", "retain_nll", "retain_accuracy",
               "holdout_nll", "holdout_accuracy", "mia_auc", "forget_exact_match",
               "forget_extraction_strength", "forget_truth_ratio", "retain_exact_match",
               "mia_auc_min_k", "mia_auc_zlib", "mia_auc_reference")
DRIFT_KEYS = ("forget_nll", "forget_accuracy", "retain_nll", "retain_accuracy",
              "forget_exact_match", "forget_truth_ratio")
GOLD_RETAIN_MIN = 0.99  # a gold below this is not a gold: the recipe failed on that seed


@dataclass(frozen=True)
class Band:
    """The gold band a method must sit in, on every seed (issue 9's goal)."""

    retain_accuracy_min: float = 0.98
    mia_gap_max: float = 0.05        # |loss-attack AUC − mean gold AUC|
    # forget NLL and forget accuracy: within [min, max] over the gold seeds;
    # KS p (NLL, vs every gold seed, mean per run) >= the lowest gold-vs-gold p.


BAND = Band()


@dataclass(frozen=True)
class BenchConfig:
    """Every size of the run; the JSON records it whole."""

    world: WorldSpec = field(default_factory=WorldSpec)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    rank: int = 8             # LoRA rank of the original and gold adapters
    train_steps: int = 1200   # AdamW steps for the original and for each gold (lr decays)
    train_lr: float = 3e-3
    train_batch: int = 32
    methods: tuple[str, ...] = tuple(METHODS)
    sequential_methods: tuple[str, ...] = ("ihl", "feature_alignment")
    sequential_requests: int = 3
    max_steps: int | None = None  # --quick only: caps every method's step budget
    threads: int = 1          # tiny models run fastest on one thread on a busy machine


FULL = BenchConfig()
QUICK = BenchConfig(world=WorldSpec(entities=20, pretrain_entities=20, pretrain_steps=60),
                    seeds=(0, 1), train_steps=120, train_lr=5e-3, train_batch=24, max_steps=5,
                    sequential_methods=("ihl",))


@dataclass(frozen=True)
class Run:
    """One row's result for one seed."""

    row: str
    seed: int | None
    metrics: dict[str, Any]
    forget_losses: list[float]
    forget_truth_ratios: list[float]
    wall_s: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def sequential_row(method: str) -> str:
    return f"{method}, sequential"


# --------------------------------------------------------------------------- scoring

class Scorer:
    """Scores base + adapter on forget, retain and the evaluation holdout (as "holdout")."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.sets = {"forget": world.forget, "retain": world.retain,
                     "holdout": world.eval_holdout}
        self.reference = self._measure(load_base(world))  # the reference attack's yardstick

    def _measure(self, model: Any) -> dict[str, SetMetrics]:
        return measure_sets(model, self.world.tokenizer, self.sets, batch_size=64)

    def __call__(self, adapter_dir: Path | None) -> tuple[dict[str, Any], SetMetrics]:
        """Summary metrics and the forget set's per-example measurements.

        A fresh base each time: PEFT edits the model it wraps.
        """
        from peft import PeftModel

        model = load_base(self.world)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
            model.eval()
        measured = self._measure(model)
        return summarize(measured, reference=self.reference), measured["forget"]


def _truth_ratios(forget: SetMetrics) -> list[float]:
    return [float(r) for r in (forget.truth_ratio or []) if r is not None]


def hyperparams_for(method: str, seed: int, cfg: BenchConfig) -> Hyperparams:
    """The rule: library defaults + seed (+ the --quick step cap). No gold, no tuning."""
    given: dict[str, Any] = {"seed": seed}
    if cfg.max_steps is not None:
        given["max_steps"] = min(cfg.max_steps, resolve_hyperparams(method).max_steps)
    return resolve_hyperparams(method, given)


# --------------------------------------------------------------------------- runs

def _log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)


def _train(world: World, data: TextDataset, out_dir: Path, cfg: BenchConfig,
           seed: int) -> tuple[Path, float]:
    """Train one original or gold adapter with the benchmark's recipe; (path, seconds)."""
    t0 = time.perf_counter()
    path = train_adapter(world, data, out_dir, rank=cfg.rank, steps=cfg.train_steps,
                         lr=cfg.train_lr, batch_size=cfg.train_batch, seed=seed)
    return path, time.perf_counter() - t0


def _unlearn(world: World, adapter: Path, forget: TextDataset, method: str, seed: int,
             cfg: BenchConfig, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    hp = hyperparams_for(method, seed, cfg)
    result = unlearn(base_model_dir=world.base_dir, adapter_dir=adapter, forget=forget,
                     retain=world.retain, holdout=world.holdout, method=method,
                     out_dir=out_dir, hyperparams=hp, device="cpu")
    return result.out_dir, result.metrics


def run_method(world: World, scorer: Scorer, adapter: Path, method: str, seed: int,
               cfg: BenchConfig, workdir: Path) -> Run:
    """unlearn() with the rule's hyperparameters; the output is scored like every row."""
    t0 = time.perf_counter()
    out, m = _unlearn(world, adapter, world.forget, method, seed, cfg,
                      workdir / f"{method}-{seed}")
    wall = time.perf_counter() - t0
    metrics, forget = scorer(out)
    # Our scoring and the library's "after" report describe the same adapter (the library
    # scores its holdout on the stopping half, so only forget and retain keys compare).
    drift = max(abs(metrics[k] - m["after"][k]) for k in DRIFT_KEYS)
    extra = {"steps": m["steps"], "max_steps": m["max_steps"], "library_metric_drift": drift,
             "stopped_early": m["stopped_early"], "target_reached": m["target_reached"],
             "library_wall_s": m["wall_time_s"], "output_rank": m["output_rank"],
             "hyperparams": dataclasses.asdict(hyperparams_for(method, seed, cfg))}
    if "before_consolidation" in m:
        extra["before_consolidation"] = m["before_consolidation"]
    if "consolidation" in m:
        extra["consolidation_inputs"] = m["consolidation"]["inputs"]
    return Run(method, seed, metrics, forget.nll, _truth_ratios(forget), wall, extra)


def run_sequential(world: World, scorer: Scorer, adapter: Path, method: str, seed: int,
                   cfg: BenchConfig, workdir: Path) -> Run:
    """`sequential_requests` forget requests in a row, each on the last one's output."""
    names = world.entities["forget"]
    parts = [names[i::cfg.sequential_requests] for i in range(cfg.sequential_requests)]
    by_entity = {name: [e for e in world.forget if f" {name} " in f" {e.prompt} "]
                 for name in names}
    t0, steps, ranks = time.perf_counter(), [], []
    current = adapter
    for k, part in enumerate(p for p in parts if p):
        forget = TextDataset([e for name in part for e in by_entity[name]], name=f"forget-{k}")
        current, m = _unlearn(world, current, forget, method, seed, cfg,
                              workdir / f"{method}-seq{k}-{seed}")
        steps.append(m["steps"])
        ranks.append(m["output_rank"])
    wall = time.perf_counter() - t0
    metrics, forget_m = scorer(current)
    extra = {"steps": sum(steps), "steps_per_request": steps, "output_ranks": ranks,
             "target_reached": None}
    return Run(sequential_row(method), seed, metrics, forget_m.nll, _truth_ratios(forget_m),
               wall, extra)


def collect_runs(world: World, cfg: BenchConfig, workdir: Path, started: float) -> list[Run]:
    """The base model once; per seed: original, gold, every method, the sequential rows."""
    scorer = Scorer(world)
    metrics, forget = scorer(None)
    runs = [Run("adapter dropped", None, metrics, forget.nll, _truth_ratios(forget), None)]
    for seed in cfg.seeds:
        original, t_orig = _train(world, world.trained, workdir / f"original-{seed}", cfg, seed)
        gold, t_gold = _train(world, world.retain, workdir / f"gold-{seed}", cfg, seed)
        for row, path, wall in (("original", original, t_orig), ("gold", gold, t_gold)):
            metrics, forget = scorer(path)
            runs.append(Run(row, seed, metrics, forget.nll, _truth_ratios(forget), wall))
            _log(started, f"seed {seed} {row}: {_brief(metrics)} ({wall:.1f} s)")
        for method in cfg.methods:
            run = run_method(world, scorer, original, method, seed, cfg, workdir)
            runs.append(run)
            _log(started, f"seed {seed} {method}: {_brief(run.metrics)} "
                          f"({run.extra['steps']} steps, {run.wall_s:.1f} s)")
        for method in cfg.sequential_methods:
            run = run_sequential(world, scorer, original, method, seed, cfg, workdir)
            runs.append(run)
            _log(started, f"seed {seed} {run.row}: {_brief(run.metrics)} "
                          f"({run.extra['steps_per_request']} steps, {run.wall_s:.1f} s)")
    return runs


def _brief(metrics: Mapping[str, Any]) -> str:
    return (f"forget NLL {metrics['forget_nll']:.2f} acc {metrics['forget_accuracy']:.2f}, "
            f"retain acc {metrics['retain_accuracy']:.2f}, holdout NLL "
            f"{metrics['holdout_nll']:.2f}, AUC {metrics['mia_auc']:.2f}")


# --------------------------------------------------------------------------- summary

def mean_sd(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample sd (n−1; 0 for a single value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def ks_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov–Smirnov p-value (scipy; exact for these small samples)."""
    return float(ks_2samp(a, b).pvalue)


@dataclass(frozen=True)
class GoldBand:
    """What the gold seeds say a model that never saw the forget set looks like."""

    golds: Sequence[Run]

    @property
    def auc(self) -> float:
        return statistics.fmean(r.metrics["mia_auc"] for r in self.golds)

    @property
    def min_k_auc(self) -> float:
        return statistics.fmean(r.metrics["mia_auc_min_k"] for r in self.golds)

    def pairs(self) -> list[tuple[int, int]]:
        n = len(self.golds)
        return [(i, j) for i in range(n) for j in range(i + 1, n)]

    def gold_ks(self, attribute: str) -> list[float]:
        return [ks_p(getattr(self.golds[i], attribute), getattr(self.golds[j], attribute))
                for i, j in self.pairs()]

    def ks(self, run: Run, attribute: str) -> list[float]:
        mine = getattr(run, attribute)
        return [ks_p(mine, getattr(g, attribute)) for g in self.golds if mine
                and getattr(g, attribute)]

    def range(self, key: str) -> tuple[float, float]:
        values = [r.metrics[key] for r in self.golds]
        return min(values), max(values)

    def privleak(self, run: Run) -> float:
        """MUSE's PrivLeak against the gold: (AUC − AUC_gold) / AUC_gold, Min-K% attack."""
        return (run.metrics["mia_auc_min_k"] - self.min_k_auc) / self.min_k_auc

    def checks(self, run: Run) -> dict[str, bool]:
        """The band's criteria on one run (one seed)."""
        m = run.metrics
        lo_nll, hi_nll = self.range("forget_nll")
        lo_acc, hi_acc = self.range("forget_accuracy")
        ks = self.ks(run, "forget_losses")
        return {
            "forget_nll": lo_nll <= m["forget_nll"] <= hi_nll,
            "forget_accuracy": lo_acc <= m["forget_accuracy"] <= hi_acc,
            "retain_accuracy": m["retain_accuracy"] >= BAND.retain_accuracy_min,
            "mia_gap": abs(m["mia_auc"] - self.auc) <= BAND.mia_gap_max,
            "ks_p": bool(ks) and statistics.fmean(ks) >= min(self.gold_ks("forget_losses")),
        }


def _stat(runs: Sequence[Run], key: str) -> dict[str, float] | None:
    values = [r.metrics[key] for r in runs if r.metrics.get(key) is not None]
    return mean_sd(values) if values else None


def summarize_runs(runs: Sequence[Run], cfg: BenchConfig) -> dict[str, Any]:
    """Rows in table order, each metric as mean ± sd, the gold band and who is inside it."""
    band = GoldBand([r for r in runs if r.row == "gold"])
    gold_ks = band.gold_ks("forget_losses")
    gold_tr_ks = band.gold_ks("forget_truth_ratios")
    names = ("original", "adapter dropped", "gold", *cfg.methods,
             *(sequential_row(m) for m in cfg.sequential_methods))
    rows = []
    for name in names:
        mine = [r for r in runs if r.row == name]
        gold_row = name == "gold"
        ks = gold_ks if gold_row else [p for r in mine for p in band.ks(r, "forget_losses")]
        tr = gold_tr_ks if gold_row else [p for r in mine
                                          for p in band.ks(r, "forget_truth_ratios")]
        row: dict[str, Any] = {"row": name, "seeds": [r.seed for r in mine]}
        for key in METRIC_KEYS:
            row[key] = _stat(mine, key)
        row["mia_gap"] = mean_sd([abs(r.metrics["mia_auc"] - band.auc) for r in mine])
        row["privleak_vs_gold"] = mean_sd([band.privleak(r) for r in mine])
        row["ks_p"] = {**mean_sd(ks), "values": ks}
        row["ks_p_truth_ratio"] = {**mean_sd(tr), "values": tr} if tr else None
        walls = [r.wall_s for r in mine if r.wall_s is not None]
        row["wall_s"] = mean_sd(walls) if walls else None
        if mine and "steps" in mine[0].extra:
            row["steps"] = mean_sd([r.extra["steps"] for r in mine])
            reached = [r.extra["target_reached"] for r in mine]
            if None not in reached:
                row["target_reached"] = sum(map(bool, reached))
            row["output_rank"] = mean_sd([r.extra.get("output_rank") or
                                          r.extra["output_ranks"][-1] for r in mine])
        if not gold_row and mine and mine[0].seed is not None:
            checks = [band.checks(r) for r in mine]
            row["in_band"] = {k: sum(c[k] for c in checks) for k in checks[0]}
            row["in_band"]["all"] = sum(all(c.values()) for c in checks)
        rows.append(row)
    gold_retain = [r.metrics["retain_accuracy"] for r in band.golds]
    return {"rows": rows, "gold_mia_auc": band.auc, "gold_min_k_auc": band.min_k_auc,
            "gold_ranges": {k: band.range(k) for k in ("forget_nll", "forget_accuracy")},
            "gold_check": {"retain_accuracy_min": GOLD_RETAIN_MIN, "values": gold_retain,
                           "passed": all(v >= GOLD_RETAIN_MIN for v in gold_retain)},
            "band": asdict(BAND),
            "gold_vs_gold_ks_p": {**mean_sd(gold_ks), "values": gold_ks,
                                  "seed_pairs": [[band.golds[i].seed, band.golds[j].seed]
                                                 for i, j in band.pairs()]},
            "gold_vs_gold_ks_p_truth_ratio": {**mean_sd(gold_tr_ks), "values": gold_tr_ks}}


# --------------------------------------------------------------------------- report

def sizes(world: World, cfg: BenchConfig) -> dict[str, Any]:
    """Every size of the run, in words and numbers, for the report."""
    spec = world.spec
    return {"entities": spec.entities, "facts_per_entity": 4,
            "forget_entities": len(world.entities["forget"]),
            "retain_entities": len(world.entities["retain"]),
            "holdout_entities": len(world.entities["holdout"]),
            "eval_holdout_entities": len(world.entities["eval_holdout"]),
            "forget_examples": len(world.forget), "retain_examples": len(world.retain),
            "holdout_examples": len(world.holdout),
            "eval_holdout_examples": len(world.eval_holdout),
            "pretrain_entities": spec.pretrain_entities,
            "vocab": len(world.tokenizer.get_vocab()),
            "model": f"Llama, {spec.layers} layers, hidden {spec.hidden}, "
                     f"{spec.heads} heads, MLP {2 * spec.hidden}",
            "lora": f"rank {cfg.rank}, alpha {2 * cfg.rank}, all 7 linear layers per block",
            "adapter_training": f"{cfg.train_steps} AdamW steps, lr {cfg.train_lr} decaying "
                                f"linearly to 0, batch {cfg.train_batch}",
            "base_pretraining": f"{spec.pretrain_steps} full-batch AdamW steps, "
                                f"lr {spec.pretrain_lr}",
            "seeds": list(cfg.seeds)}


def run_benchmark(cfg: BenchConfig, command: str, workdir: Path | None = None
                  ) -> dict[str, Any]:
    """Build the world, run every row for every seed, summarise. JSON-ready."""
    started, load_before = time.perf_counter(), os.getloadavg()
    with torch_threads(cfg.threads), _workdir(workdir) as root:
        world = build_world(root, cfg.world)
        _log(started, f"world built: {len(world.forget)} forget, {len(world.retain)} "
                      f"retain, {len(world.holdout)} + {len(world.eval_holdout)} holdout "
                      "examples")
        runs = collect_runs(world, cfg, root, started)
        world_sizes = sizes(world, cfg)
    return {
        "benchmark": "unlearn_quality", "command": command, "config": asdict(cfg),
        "sizes": world_sizes, "hyperparameter_rule": HYPERPARAMETER_RULE,
        "hyperparams": {m: dataclasses.asdict(hyperparams_for(m, 0, cfg))
                        for m in cfg.methods},
        "machine": {**machine_info(cfg.threads, ("transformers", "peft", "scipy")),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "total_wall_s": time.perf_counter() - started,
        **summarize_runs(runs, cfg),
        "runs": [asdict(r) for r in runs],
    }


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="unlearn-quality-") as tmp:
        yield Path(tmp)


def _pm(stat: Mapping[str, float] | None, digits: int = 2) -> str:
    if stat is None:
        return "—"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _band_cell(row: Mapping[str, Any]) -> str:
    if "in_band" not in row:
        return "—"
    n, c = len(row["seeds"]), row["in_band"]
    return (f"**{c['all']}/{n}** (NLL {c['forget_nll']}, acc {c['forget_accuracy']}, "
            f"retain {c['retain_accuracy']}, AUC {c['mia_gap']}, KS {c['ks_p']})")


def render(result: Mapping[str, Any]) -> str:
    """The markdown report: the band table, the further metrics, spread, rule, sizes."""
    lines = ["| row | forget NLL | forget acc | retain acc | \\|AUC − gold AUC\\| | "
             "KS p vs gold | steps | in gold band (seeds) |", "|" + "---|" * 8]
    for row in result["rows"]:
        steps = _pm(row.get("steps"), 0) if "steps" in row else "—"
        if "target_reached" in row:
            steps += f" ({row['target_reached']}/{len(row['seeds'])} reached)"
        ks = _pm(row["ks_p"], 3) + (" (gold vs gold)" if row["row"] == "gold" else "")
        lines.append(
            f"| {row['row']} | {_pm(row['forget_nll'])} | {_pm(row['forget_accuracy'])} | "
            f"{_pm(row['retain_accuracy'])} | {_pm(row['mia_gap'], 3)} | {ks} | {steps} | "
            f"{_band_cell(row)} |")
    lines += ["", "| row | exact match forget / retain | extraction strength | truth ratio | "
              "KS p truth ratio | AUC Min-K% | AUC zlib | AUC reference | PrivLeak vs gold | "
              "output rank | wall s |", "|" + "---|" * 11]
    for row in result["rows"]:
        tr = _pm(row["ks_p_truth_ratio"], 3) + (" (gold vs gold)" if row["row"] == "gold"
                                                 else "")
        lines.append(
            f"| {row['row']} | {_pm(row['forget_exact_match'])} / "
            f"{_pm(row['retain_exact_match'])} | {_pm(row['forget_extraction_strength'])} | "
            f"{_pm(row['forget_truth_ratio'])} | {tr} | {_pm(row['mia_auc_min_k'])} | "
            f"{_pm(row['mia_auc_zlib'])} | {_pm(row['mia_auc_reference'])} | "
            f"{_pm(row['privleak_vs_gold'])} | {_pm(row.get('output_rank'), 0)} | "
            f"{_pm(row['wall_s'], 1)} |")
    gg, s, m = result["gold_vs_gold_ks_p"], result["sizes"], result["machine"]
    check, ranges = result["gold_check"], result["gold_ranges"]
    band = result["band"]
    lines += [
        "",
        f"Gold band, per seed: forget NLL in [{ranges['forget_nll'][0]:.2f}, "
        f"{ranges['forget_nll'][1]:.2f}] and forget accuracy in "
        f"[{ranges['forget_accuracy'][0]:.2f}, {ranges['forget_accuracy'][1]:.2f}] (min..max "
        f"over gold seeds), retain accuracy >= {band['retain_accuracy_min']}, |AUC − gold AUC| "
        f"<= {band['mia_gap_max']}, mean KS p vs the gold seeds >= the lowest gold-vs-gold p "
        f"({min(gg['values']):.3f}). Gold MIA AUC (mean of gold seeds): "
        f"{result['gold_mia_auc']:.3f}; gold-vs-gold KS p on NLL: "
        f"{', '.join(f'{v:.3f}' for v in gg['values'])}; on truth ratio: "
        f"{', '.join(f'{v:.3f}' for v in result['gold_vs_gold_ks_p_truth_ratio']['values'])}."
        f" Gold check (retain accuracy >= {check['retain_accuracy_min']}): "
        f"{'passed' if check['passed'] else 'FAILED'} "
        f"({', '.join(f'{v:.3f}' for v in check['values'])}).",
        "",
        "mean ± sd (n−1) over seeds " + ", ".join(map(str, s["seeds"])) + "; KS p: over "
        "every (run, gold seed) pair; adapter dropped is one run (no seed). Scored on forget, "
        "retain and the evaluation half of the holdout (the methods stop on the other half). "
        "Exact match: greedy decoding reproduces the whole answer; extraction strength: "
        "1 − (shortest answer prefix after which greedy decoding completes it)/length; truth "
        "ratio: geometric-mean probability of 3 wrong answers over the right one's (≈1 no "
        "preference, TOFU); reference attack: NLL minus the base model's; PrivLeak: "
        "(Min-K% AUC − gold's)/gold's (MUSE). Wall s: training time for original and gold, "
        "the whole `unlearn()` call for methods (all requests for sequential rows). steps: "
        "optimisation steps taken; reached: runs whose forget NLL reached the holdout NLL.",
        "",
        f"Hyperparameters: {result['hyperparameter_rule']}",
        "",
        f"Sizes: {s['entities']} entities × {s['facts_per_entity']} facts; forget "
        f"{s['forget_entities']} entities ({s['forget_examples']} facts), retain "
        f"{s['retain_entities']} ({s['retain_examples']}), holdout {s['holdout_entities']} "
        f"+ {s['eval_holdout_entities']} ({s['holdout_examples']} + "
        f"{s['eval_holdout_examples']}); base pretrained on {s['pretrain_entities']} other "
        f"entities ({s['base_pretraining']}); vocab {s['vocab']}; {s['model']}; LoRA "
        f"{s['lora']}; original and gold: {s['adapter_training']}.",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} thread), transformers {m.get('transformers', '?')}, peft "
        f"{m.get('peft', '?')}; load average before/after {m['loadavg_before'][0]:.1f}/"
        f"{m['loadavg_after'][0]:.1f}. Total wall time {result['total_wall_s']:.0f} s.",
        "",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny world, 2 seeds, 5-step methods; writes nothing unless --out")
    parser.add_argument("--sequential", nargs="*", choices=sorted(METHODS),
                        help="methods for the sequential-requests rows (default: ihl, "
                             "feature_alignment; none: no such rows)")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1; default 5)")
    parser.add_argument("--entities", type=int, help="fictitious entities (default 100)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                        help="methods to run (default: all)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, help=f"JSON path (default {DEFAULT_OUT})")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> BenchConfig:
    cfg = QUICK if args.quick else FULL
    if args.seeds is not None:
        if args.seeds < 2:
            raise SystemExit("--seeds must be >= 2 (the gold band needs two gold seeds)")
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.entities is not None:
        cfg = replace(cfg, world=replace(cfg.world, entities=args.entities))
    if args.methods:
        cfg = replace(cfg, methods=tuple(args.methods))
    if args.sequential is not None:
        cfg = replace(cfg, sequential_methods=tuple(args.sequential))
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        cfg = replace(cfg, threads=args.threads)
    try:
        cfg.world.validate()
    except ValueError as e:
        raise SystemExit(f"--entities: {e}") from None
    return cfg


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """No progress bars, library INFO lines or transformers deprecation noise in the output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    names = ("lorafold", "transformers", "peft")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = config_from(args)
    command = command_line(__file__, argv)
    with quiet_libraries():
        result = run_benchmark(cfg, command)
    report = render(result)
    print(report)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        write_json(result, out)
        out.with_suffix(".md").write_text(f"# Unlearning quality\n\n{report}\n",
                                          encoding="utf-8")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
