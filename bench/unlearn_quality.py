"""Unlearning quality: every method against the gold of retraining without the forget set.

World (bench/unlearn_world.py): a tiny Llama pretrained on facts about other entities;
100 fictitious entities with 4 facts each; forget = 10% of the entities, holdout = 10%
never trained, retain = the rest. Per seed:

- original: a LoRA trained on forget + retain;
- gold: a LoRA trained the same way on retain only (what unlearning should reach);
- every method of `lorafold.unlearn` run on that seed's original, with the forget,
  retain and holdout sets;
- adapter dropped: the base model alone (one row, no seed).

Each row is scored the same way: forget NLL and token accuracy, retain accuracy, holdout
NLL, |MIA AUC − gold AUC| (loss attack, forget vs holdout), and the two-sample KS p-value
of the row's per-example forget losses against each gold seed's (beside it, the gold-vs-gold
p-values between pairs of gold seeds); wall time; mean ± sd over seeds.

Hyperparameters never look at the gold: each method runs with the library's defaults, the
run's seed, and the library's gold-free stopping rule (stop when forget NLL reaches holdout
NLL).

    .venv/bin/python bench/unlearn_quality.py            # full run, ~5 min on 2 cores
    .venv/bin/python bench/unlearn_quality.py --quick    # tiny world, ~30 s, nothing written
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from machine import machine_info
from scipy.stats import ks_2samp
from unlearn_world import World, WorldSpec, build_world, load_base, train_adapter

from lorafold.unlearn import METHODS, Hyperparams, TextDataset, resolve_hyperparams, unlearn
from lorafold.unlearn.datasets import encode, make_batches, pad_id_of
from lorafold.unlearn.metrics import measure, summarize

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "unlearn_quality.json"
HYPERPARAMETER_RULE = (
    "library defaults per method (lorafold.unlearn.objectives.METHODS), the run's seed, and "
    "the library's gold-free stopping rule: stop as soon as forget-set NLL >= holdout-set "
    "NLL (checked every eval_every steps) or at max_steps. Nothing is tuned; the gold is "
    "never consulted.")
METRIC_KEYS = ("forget_nll", "forget_accuracy", "retain_nll", "retain_accuracy",
               "holdout_nll", "holdout_accuracy", "mia_auc")


@dataclass(frozen=True)
class BenchConfig:
    """Every size of the run; the JSON records it whole."""

    world: WorldSpec = field(default_factory=WorldSpec)
    seeds: tuple[int, ...] = (0, 1, 2)
    rank: int = 8             # LoRA rank of the original and gold adapters
    train_steps: int = 800    # AdamW steps for the original and for each gold
    train_lr: float = 3e-3
    train_batch: int = 32
    methods: tuple[str, ...] = tuple(METHODS)
    max_steps: int | None = None  # --quick only: caps every method's step budget
    threads: int = 1          # tiny models run fastest on one thread on a busy machine


FULL = BenchConfig()
QUICK = BenchConfig(world=WorldSpec(entities=20, pretrain_entities=20, pretrain_steps=60),
                    seeds=(0, 1), train_steps=120, train_lr=5e-3, train_batch=24, max_steps=5)


@dataclass(frozen=True)
class Run:
    """One row's result for one seed."""

    row: str
    seed: int | None
    metrics: dict[str, float]
    forget_losses: list[float]
    wall_s: float | None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- scoring

def score(model: Any, world: World) -> tuple[dict[str, float], list[float]]:
    """Summary metrics (lorafold.unlearn.metrics) and the per-example forget-set NLLs."""
    pad_id = pad_id_of(world.tokenizer)
    sets = {"forget": world.forget, "retain": world.retain, "holdout": world.holdout}
    measured = {name: measure(model, make_batches(encode(world.tokenizer, ds), batch_size=64,
                                                  pad_id=pad_id))
                for name, ds in sets.items()}
    return summarize(measured), measured["forget"].nll


def score_adapter(world: World, adapter_dir: Path | None) -> tuple[dict[str, float], list[float]]:
    """Score base + adapter (a fresh base each time: PEFT edits the model it wraps)."""
    from peft import PeftModel

    model = load_base(world)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        model.eval()
    return score(model, world)


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


def run_method(world: World, adapter: Path, method: str, seed: int, cfg: BenchConfig,
               workdir: Path) -> Run:
    """unlearn() with the rule's hyperparameters; the output is scored like every row."""
    hp = hyperparams_for(method, seed, cfg)
    t0 = time.perf_counter()
    result = unlearn(base_model_dir=world.base_dir, adapter_dir=adapter, forget=world.forget,
                     retain=world.retain, holdout=world.holdout, method=method,
                     out_dir=workdir / f"{method}-{seed}", hyperparams=hp, device="cpu")
    wall = time.perf_counter() - t0
    metrics, losses = score_adapter(world, result.out_dir)
    m = result.metrics
    # Our scoring and the library's "after" report describe the same adapter.
    drift = max(abs(metrics[k] - m["after"][k]) for k in METRIC_KEYS)
    extra = {"steps": m["steps"], "max_steps": m["max_steps"],
             "stopped_early": m["stopped_early"], "target_reached": m["target_reached"],
             "library_wall_s": m["wall_time_s"], "library_metric_drift": drift,
             "hyperparams": dataclasses.asdict(hp)}
    if "before_consolidation" in m:
        extra["before_consolidation"] = m["before_consolidation"]
        extra["consolidation_inputs"] = m["consolidation"]["inputs"]
    return Run(method, seed, metrics, losses, wall, extra)


def collect_runs(world: World, cfg: BenchConfig, workdir: Path, started: float) -> list[Run]:
    """The base model once; per seed: original, gold, then every method on that original."""
    metrics, losses = score_adapter(world, None)
    runs = [Run("adapter dropped", None, metrics, losses, None)]
    for seed in cfg.seeds:
        original, t_orig = _train(world, world.trained, workdir / f"original-{seed}", cfg, seed)
        gold, t_gold = _train(world, world.retain, workdir / f"gold-{seed}", cfg, seed)
        for row, path, wall in (("original", original, t_orig), ("gold", gold, t_gold)):
            metrics, losses = score_adapter(world, path)
            runs.append(Run(row, seed, metrics, losses, wall))
            _log(started, f"seed {seed} {row}: {_brief(metrics)} ({wall:.1f} s)")
        for method in cfg.methods:
            run = run_method(world, original, method, seed, cfg, workdir)
            runs.append(run)
            _log(started, f"seed {seed} {method}: {_brief(run.metrics)} "
                          f"({run.extra['steps']} steps, {run.wall_s:.1f} s)")
    return runs


def _brief(metrics: Mapping[str, float]) -> str:
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


def summarize_runs(runs: Sequence[Run], cfg: BenchConfig) -> dict[str, Any]:
    """Rows in table order, each metric as mean ± sd, plus the gold band it is read against."""
    golds = [r for r in runs if r.row == "gold"]
    gold_auc = statistics.fmean(r.metrics["mia_auc"] for r in golds)
    gold_pairs = [(i, j) for i in range(len(golds)) for j in range(i + 1, len(golds))]
    gold_ks = [ks_p(golds[i].forget_losses, golds[j].forget_losses) for i, j in gold_pairs]
    rows = []
    for name in ("original", "adapter dropped", "gold", *cfg.methods):
        mine = [r for r in runs if r.row == name]
        if name == "gold":
            ks = gold_ks
        else:
            ks = [ks_p(r.forget_losses, g.forget_losses) for r in mine for g in golds]
        row: dict[str, Any] = {"row": name, "seeds": [r.seed for r in mine]}
        for key in METRIC_KEYS:
            row[key] = mean_sd([r.metrics[key] for r in mine])
        row["mia_gap"] = mean_sd([abs(r.metrics["mia_auc"] - gold_auc) for r in mine])
        row["ks_p"] = {**mean_sd(ks), "values": ks}
        walls = [r.wall_s for r in mine if r.wall_s is not None]
        row["wall_s"] = mean_sd(walls) if walls else None
        if name in cfg.methods:
            row["steps"] = mean_sd([r.extra["steps"] for r in mine])
            row["target_reached"] = sum(bool(r.extra["target_reached"]) for r in mine)
        rows.append(row)
        if mine and all("before_consolidation" in r.extra for r in mine):
            rows.append(stacked_row(name, mine, gold_auc))
    return {"rows": rows, "gold_mia_auc": gold_auc,
            "gold_vs_gold_ks_p": {**mean_sd(gold_ks), "values": gold_ks,
                                  "seed_pairs": [[golds[i].seed, golds[j].seed]
                                                 for i, j in gold_pairs]}}


def stacked_row(name: str, runs: Sequence[Run], gold_auc: float) -> dict[str, Any]:
    """feature_alignment before its rank-r consolidation: the model it trained, not its output.

    Only the library's summary metrics exist for it (no per-example losses: no KS).
    """
    stacked = [r.extra["before_consolidation"] for r in runs]
    row: dict[str, Any] = {"row": f"{name}, stacked*",
                           "seeds": [r.seed for r in runs], "stacked": True}
    for key in METRIC_KEYS:
        row[key] = mean_sd([m[key] for m in stacked])
    row["mia_gap"] = mean_sd([abs(m["mia_auc"] - gold_auc) for m in stacked])
    row["ks_p"] = None
    row["wall_s"] = None
    return row


# --------------------------------------------------------------------------- report

def sizes(world: World, cfg: BenchConfig) -> dict[str, Any]:
    """Every size of the run, in words and numbers, for the report."""
    spec = world.spec
    return {"entities": spec.entities, "facts_per_entity": 4,
            "forget_entities": len(world.entities["forget"]),
            "retain_entities": len(world.entities["retain"]),
            "holdout_entities": len(world.entities["holdout"]),
            "forget_examples": len(world.forget), "retain_examples": len(world.retain),
            "holdout_examples": len(world.holdout),
            "pretrain_entities": spec.pretrain_entities,
            "vocab": len(world.tokenizer.get_vocab()),
            "model": f"Llama, {spec.layers} layers, hidden {spec.hidden}, "
                     f"{spec.heads} heads, MLP {2 * spec.hidden}",
            "lora": f"rank {cfg.rank}, alpha {2 * cfg.rank}, all 7 linear layers per block",
            "adapter_training": f"{cfg.train_steps} AdamW steps, lr {cfg.train_lr}, "
                                f"batch {cfg.train_batch}",
            "base_pretraining": f"{spec.pretrain_steps} full-batch AdamW steps, "
                                f"lr {spec.pretrain_lr}",
            "seeds": list(cfg.seeds)}


def run_benchmark(cfg: BenchConfig, command: str, workdir: Path | None = None
                  ) -> dict[str, Any]:
    """Build the world, run every row for every seed, summarise. JSON-ready."""
    started, load_before = time.perf_counter(), os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with _workdir(workdir) as root:
            world = build_world(root, cfg.world)
            _log(started, f"world built: {len(world.forget)} forget, {len(world.retain)} "
                          f"retain, {len(world.holdout)} holdout examples")
            runs = collect_runs(world, cfg, root, started)
            world_sizes = sizes(world, cfg)
    finally:
        torch.set_num_threads(threads)
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


def render(result: Mapping[str, Any]) -> str:
    """The markdown report: table, gold-vs-gold spread, rule, sizes, machine."""
    header = ("| row | forget NLL | forget acc | retain acc | holdout NLL | "
              "\\|AUC − gold AUC\\| | KS p vs gold | steps | wall s |")
    lines = [header, "|" + "---|" * 9]
    for row in result["rows"]:
        steps = _pm(row["steps"], 0) if "steps" in row else "—"
        if "target_reached" in row:
            steps += f" ({row['target_reached']}/{len(row['seeds'])} reached)"
        ks = _pm(row["ks_p"], 3) + (" (gold vs gold)" if row["row"] == "gold" else "")
        if row.get("stacked"):
            ks = "—"
        lines.append(
            f"| {row['row']} | {_pm(row['forget_nll'])} | {_pm(row['forget_accuracy'])} | "
            f"{_pm(row['retain_accuracy'])} | {_pm(row['holdout_nll'])} | "
            f"{_pm(row['mia_gap'], 3)} | {ks} | {steps} | {_pm(row['wall_s'], 1)} |")
    gg, s, m = result["gold_vs_gold_ks_p"], result["sizes"], result["machine"]
    lines += [
        "",
        f"Gold MIA AUC (mean of gold seeds): {result['gold_mia_auc']:.3f}. Gold-vs-gold KS "
        f"p-values (pairs of gold seeds): {', '.join(f'{v:.3f}' for v in gg['values'])}.",
        "",
        "mean ± sd (n−1) over seeds " + ", ".join(map(str, s["seeds"])) + "; KS p: over "
        "every (run, gold seed) pair; adapter dropped is one run (no seed). Wall s: "
        "training time for original and gold, the whole `unlearn()` call (load, evaluate, "
        "train, write, re-evaluate) for methods. steps: optimisation steps taken; reached: "
        "runs whose forget NLL reached the holdout NLL.",
        "",
        "\\* feature_alignment, stacked: the model it trained (base + original + residual "
        "LoRA) before the rank-r consolidation that produces its output; the library "
        "reports only summary metrics for it (`before_consolidation`), so no KS.",
        "",
        f"Hyperparameters: {result['hyperparameter_rule']}",
        "",
        f"Sizes: {s['entities']} entities × {s['facts_per_entity']} facts; forget "
        f"{s['forget_entities']} entities ({s['forget_examples']} facts), retain "
        f"{s['retain_entities']} ({s['retain_examples']}), holdout {s['holdout_entities']} "
        f"({s['holdout_examples']}); base pretrained on {s['pretrain_entities']} other "
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
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1; default 3)")
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
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    with quiet_libraries():
        result = run_benchmark(cfg, command)
    report = render(result)
    print(report)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(f"# Unlearning quality\n\n{report}\n",
                                          encoding="utf-8")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
