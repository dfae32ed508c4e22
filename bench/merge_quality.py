"""Merge quality: how much of each task a merged LoRA keeps, per method, rule and output rank.

A tiny Llama-style causal LM is pretrained in the run on a synthetic "public" corpus; then
T tasks get one rank-8 LoRA each, and the T adapters are merged with every method. For
each task the benchmark reports the merged adapter's accuracy divided by the task's own
adapter's accuracy (normalised accuracy), mean ± sd over seeds.

Tasks. A shared vocabulary holds BOS, "=", T task tags and T disjoint domains of K tokens.
A sequence reads ``BOS <tag_t> x1 x2 x3 = y`` with x1..x3 from domain t and y in domain t.
Skill t is a function of (x1, x2, x3) (first, last, max, min, median, first+1, second,
last−1, in that order). The public corpus pairs tag t with skill t on *every* domain, so the
base model knows every question. Task t asks for a secret re-keying of the answer:
y = π_t(skill_t(x)) with π_t a random permutation of domain t. The base model therefore
answers the public key (right only where π_t has a fixed point), its own adapter learns π_t,
and merged adapters must keep T permutations on disjoint token ranges at once.

Protocol (as in the task-arithmetic and TIES papers): every method gets one global scale λ
on the merged delta, picked per seed, method and rank from `scales` by mean normalised
accuracy on a validation split; the test split is only used at the chosen λ. Full-space
`ta`/`ties`/`iso` apply lorafold's rules to the stacked dense ΔW_t in this script (no rank
limit); every other method is `lorafold.merge.merge_adapters`, whose output PEFT adapter is
read back and added to the base weights.

    .venv/bin/python bench/merge_quality.py            # full run, ~5 min on 2 cores
    .venv/bin/python bench/merge_quality.py --quick    # tiny sizes, no files written
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from machine import machine_info

from lorafold.adapters.config import PEFT_PREFIX
from lorafold.adapters.reader import open_adapter
from lorafold.merge import MergeRequest, merge_adapters
from lorafold.merge.rules import RULES, RuleParams

RESULTS = Path(__file__).resolve().parent / "results"
BASE_NAME = "lorafold-bench/merge-quality-base"
SKILL_NAMES = ("first", "last", "max", "min", "median", "first+1", "second", "last-1")
Deltas = dict[str, torch.Tensor]          # model parameter name -> dense ΔW (out × in)
Family = Literal["lorafold", "dense"]


@dataclass(frozen=True)
class QualityConfig:
    """Every size of one run (all of it lands in the JSON)."""

    tasks: int = 8                    # T: tasks, adapters, domains
    domain: int = 8                   # K: tokens per domain (chance accuracy 1/K)
    hidden: int = 128
    intermediate: int = 256
    layers: int = 2
    heads: int = 4
    pretrain_steps: int = 2000
    pretrain_lr: float = 3e-3
    batch: int = 64
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_steps: int = 300
    lora_lr: float = 1e-3
    lora_targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    val_per_task: int = 96            # held-out inputs per task (of K³), picks λ
    test_per_task: int = 160          # held-out inputs per task (of K³), reported
    ranks: tuple[int, ...] = (8, 16, 32)
    scales: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
    density: float = 0.5              # ties / dare keep fraction
    seeds: tuple[int, ...] = (0, 1, 2)
    base_seed: int = 1234             # the base model is pretrained once per run
    threads: int = 1

    def check(self) -> None:
        if not 1 <= self.tasks <= len(SKILL_NAMES):
            raise ValueError(f"tasks must be in 1..{len(SKILL_NAMES)}")
        if self.val_per_task + self.test_per_task >= self.domain ** 3:
            raise ValueError("val + test must leave training inputs (domain³ in all)")


FULL = QualityConfig()
QUICK = replace(FULL, tasks=3, domain=8, hidden=64, intermediate=128, heads=2,
                pretrain_steps=300, lora_steps=120, lora_lr=3e-3, val_per_task=64,
                test_per_task=128, ranks=(4,), scales=(0.5, 1.0), seeds=(0,))


# ----------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Vocab:
    """Token ids: BOS, "=", one tag per task, then T domains of K tokens."""

    tasks: int
    domain: int
    bos: int = 0
    eq: int = 1

    def tag(self, t: torch.Tensor) -> torch.Tensor:
        return 2 + t

    def token(self, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 2 + self.tasks + d * self.domain + x

    @property
    def size(self) -> int:
        return 2 + self.tasks + self.tasks * self.domain


def skill_answers(x: torch.Tensor, domain: int) -> torch.Tensor:
    """(n, 3) inputs in 0..K-1 -> (n, 8) answers of every skill in SKILL_NAMES order."""
    x1, x2, x3 = x.unbind(-1)
    return torch.stack([x1, x3, x.max(-1).values, x.min(-1).values, x.median(-1).values,
                        (x1 + 1) % domain, x2, (x3 - 1) % domain], dim=-1)


def sequences(vocab: Vocab, tag: torch.Tensor, dom: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
    """``BOS tag x1 x2 x3 = y`` rows, (n, 7) int64."""
    n = x.shape[0]
    return torch.cat([torch.full((n, 1), vocab.bos), vocab.tag(tag)[:, None],
                      vocab.token(dom[:, None], x), torch.full((n, 1), vocab.eq),
                      vocab.token(dom, y)[:, None]], dim=1)


def public_batch(vocab: Vocab, n: int, gen: torch.Generator) -> torch.Tensor:
    """The public corpus: skill t under tag t, on a random domain, with the plain answer."""
    skill = torch.randint(0, vocab.tasks, (n,), generator=gen)
    dom = torch.randint(0, vocab.tasks, (n,), generator=gen)
    x = torch.randint(0, vocab.domain, (n, 3), generator=gen)
    y = skill_answers(x, vocab.domain).gather(1, skill[:, None])[:, 0]
    return sequences(vocab, skill, dom, x, y)


@dataclass(frozen=True)
class TaskSuite:
    """The T private tasks of one seed: permutations and disjoint input splits."""

    vocab: Vocab
    perms: torch.Tensor                       # (T, K): π_t
    splits: dict[str, list[torch.Tensor]]     # split -> per task (n, 3) inputs

    def examples(self, t: int, x: torch.Tensor) -> torch.Tensor:
        task = torch.full((x.shape[0],), t)
        y = self.perms[t][skill_answers(x, self.vocab.domain)[:, t]]
        return sequences(self.vocab, task, task, x, y)

    def eval_set(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All tasks' rows of a split and the task of each row."""
        rows = [self.examples(t, x) for t, x in enumerate(self.splits[split])]
        owner = torch.cat([torch.full((len(r),), t) for t, r in enumerate(rows)])
        return torch.cat(rows), owner


def make_tasks(cfg: QualityConfig, seed: int) -> TaskSuite:
    """Permutations and a train/val/test split of all K³ inputs, per task, from `seed`."""
    vocab = Vocab(cfg.tasks, cfg.domain)
    gen = torch.Generator().manual_seed(10_000 + seed)
    grid = torch.tensor(list(itertools.product(range(cfg.domain), repeat=3)))
    perms = torch.stack([torch.randperm(cfg.domain, generator=gen) for _ in range(cfg.tasks)])
    splits: dict[str, list[torch.Tensor]] = {"test": [], "val": [], "train": []}
    cut_test, cut_val = cfg.test_per_task, cfg.test_per_task + cfg.val_per_task
    for _ in range(cfg.tasks):
        order = grid[torch.randperm(len(grid), generator=gen)]
        splits["test"].append(order[:cut_test])
        splits["val"].append(order[cut_test:cut_val])
        splits["train"].append(order[cut_val:])
    return TaskSuite(vocab=vocab, perms=perms, splits=splits)


# ----------------------------------------------------------------------------- model

def answer_logits(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Logits for the token after "=" (the answer), from ``BOS tag x1 x2 x3 =``."""
    out = model(input_ids=rows[:, :-1], use_cache=False, logits_to_keep=1)
    return out.logits[:, -1]


def answer_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(answer_logits(model, rows), rows[:, -1])


def fit(model: torch.nn.Module, params: Sequence[torch.nn.Parameter],
        batches: Callable[[], torch.Tensor], *, steps: int, lr: float) -> float:
    """AdamW with a one-cycle schedule on the answer loss; returns the last loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(steps):
        loss = answer_loss(model, batches())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def pretrain_base(cfg: QualityConfig) -> torch.nn.Module:
    """A tiny Llama (untied LM head) trained from scratch on the public corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = Vocab(cfg.tasks, cfg.domain)
    torch.manual_seed(cfg.base_seed)
    config = LlamaConfig(vocab_size=vocab.size, hidden_size=cfg.hidden,
                         intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=8, tie_word_embeddings=False,
                         bos_token_id=vocab.bos, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    model.config._name_or_path = BASE_NAME     # recorded in the adapters' configs
    gen = torch.Generator().manual_seed(cfg.base_seed)
    fit(model, list(model.parameters()), lambda: public_batch(vocab, cfg.batch, gen),
        steps=cfg.pretrain_steps, lr=cfg.pretrain_lr)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_adapter(base: torch.nn.Module, suite: TaskSuite, t: int, cfg: QualityConfig,
                  seed: int, out_dir: Path) -> Path:
    """One rank-r LoRA on task t (base frozen), written with PEFT's save_pretrained."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed * 1_000 + t)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=list(cfg.lora_targets), bias="none")
    model = get_peft_model(base, lora)
    train = suite.splits["train"][t]
    gen = torch.Generator().manual_seed(20_000 + seed * 1_000 + t)

    def batch() -> torch.Tensor:
        return suite.examples(t, train[torch.randint(0, len(train), (cfg.batch,),
                                                     generator=gen)])

    params = [p for p in model.parameters() if p.requires_grad]
    fit(model, params, batch, steps=cfg.lora_steps, lr=cfg.lora_lr)
    model.save_pretrained(str(out_dir))
    model.unload()                             # strip the LoRA layers off `base` again
    return out_dir


def read_deltas(adapter_dir: Path) -> Deltas:
    """Dense ΔW = scale·B·A per module of a PEFT LoRA dir, keyed by parameter name."""
    deltas: Deltas = {}
    with open_adapter(adapter_dir) as adapter:
        for factors in adapter.iter_modules():
            if factors.spec.kind != "linear" or adapter.config.fan_in_fan_out:
                raise ValueError(f"{factors.spec.name}: only plain Linear LoRA is expected")
            name = factors.spec.name.removeprefix(PEFT_PREFIX) + ".weight"
            deltas[name] = factors.scale * (factors.B.float() @ factors.A.float())
    return deltas


class Evaluator:
    """Exact-match answer accuracy per task of base + Δ, for the val and test splits."""

    def __init__(self, model: torch.nn.Module, suite: TaskSuite, targets: Sequence[str],
                 chunk: int = 4096) -> None:
        self.model = model
        self.tasks = suite.vocab.tasks
        self.chunk = chunk
        self.sets = {split: suite.eval_set(split) for split in ("val", "test")}
        self.params = {name: p for name, p in model.named_parameters()
                       if any(name.endswith(f".{t}.weight") for t in targets)}
        self.base = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def set_delta(self, deltas: Mapping[str, torch.Tensor]) -> None:
        unknown = set(deltas) - set(self.params)
        if unknown:
            raise KeyError(f"deltas for modules the base has no target for: {sorted(unknown)}")
        for name, param in self.params.items():
            param.copy_(self.base[name])
            if name in deltas:
                param.add_(deltas[name].to(param.dtype))

    @torch.no_grad()
    def accuracies(self, deltas: Mapping[str, torch.Tensor], split: str) -> list[float]:
        rows, owner = self.sets[split]
        self.set_delta(deltas)
        correct = torch.cat([answer_logits(self.model, part).argmax(-1) == part[:, -1]
                             for part in rows.split(self.chunk)])
        self.set_delta({})
        hits = torch.bincount(owner, weights=correct.double(), minlength=self.tasks)
        counts = torch.bincount(owner, minlength=self.tasks).double()
        return (hits / counts).tolist()


# ----------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class Method:
    """One merged-adapter recipe. `dense` = the rule on full ΔW_t in this script."""

    label: str
    family: Family
    method: str            # lorafold method name ("full" for dense)
    rule: str = "ta"
    balance: bool = False

    @property
    def ranked(self) -> bool:
        return self.family == "lorafold" and self.method != "cat"


def default_methods() -> tuple[Method, ...]:
    ctm = [Method(f"ctm-{rule}{'-bal' if bal else ''}", "lorafold", "ctm", rule, bal)
           for bal in (False, True) for rule in ("ta", "ties", "dare", "iso")]
    return (Method("cat", "lorafold", "cat"), Method("full-ta", "dense", "full", "ta"),
            Method("full-ties", "dense", "full", "ties"),
            Method("full-iso", "dense", "full", "iso"),
            Method("mtc-ta", "lorafold", "mtc", "ta"),
            Method("mtc-ties", "lorafold", "mtc", "ties"), *ctm,
            Method("core-ta", "lorafold", "core", "ta"))


@dataclass
class MergeInputs:
    """What every merge of one seed starts from."""

    adapters: list[Path]
    stack: dict[str, torch.Tensor]     # parameter name -> (T, out, in) dense ΔW_t
    density: float
    seed: int
    workdir: Path
    count: itertools.count = field(default_factory=itertools.count)


def _density(rule: str, density: float) -> float | None:
    return density if RULES[rule].uses_density else None


def merge_lorafold(m: Method, inputs: MergeInputs, rank: int | None,
                   scale: float) -> tuple[Deltas, float]:
    """merge_adapters → PEFT dir → dense deltas. λ is `scale`, or the weights for cat."""
    n = len(inputs.adapters)
    if m.method == "cat":
        request = MergeRequest(method="cat", weights=(scale,) * n)
    else:
        request = MergeRequest(method=m.method, rule=m.rule, rank=rank, scale=scale,
                               density=_density(m.rule, inputs.density), seed=inputs.seed,
                               balance=m.balance)
    out = inputs.workdir / f"merge-{next(inputs.count)}"
    result = merge_adapters(inputs.adapters, out, request)
    deltas = read_deltas(result.out_dir)
    shutil.rmtree(result.out_dir)
    return deltas, result.wall_time_s


def merge_dense(m: Method, inputs: MergeInputs, rank: int | None,
                scale: float) -> tuple[Deltas, float]:
    """The rule on the stacked dense ΔW_t of each module, no rank limit, weights 1."""
    spec = RULES[m.rule]
    params = RuleParams(density=inputs.density, scale=scale)
    started = time.perf_counter()
    deltas = {}
    for name, stack in inputs.stack.items():
        weights = torch.ones(stack.shape[0], dtype=torch.float64)
        deltas[name] = spec.fn(stack, weights, params, None)
    return deltas, time.perf_counter() - started


MERGERS: dict[Family, Callable[[Method, MergeInputs, int | None, float],
                               tuple[Deltas, float]]] = {
    "lorafold": merge_lorafold, "dense": merge_dense}


# ----------------------------------------------------------------------------- protocol

def normalised(acc: Sequence[float], own: Sequence[float]) -> list[float]:
    """Per task merged / own accuracy (0 where the own adapter scores 0)."""
    return [a / o if o > 0 else 0.0 for a, o in zip(acc, own, strict=True)]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def run_method(m: Method, rank: int | None, inputs: MergeInputs, evaluator: Evaluator,
               own: Mapping[str, list[float]], scales: Sequence[float]) -> dict[str, Any]:
    """Pick λ on validation (ties go to the smaller λ), then score the test split at that λ
    only."""
    merge = MERGERS[m.family]
    curve: dict[str, float] = {}
    times: list[float] = []
    best: tuple[float, float, Deltas] | None = None
    for scale in scales:
        deltas, seconds = merge(m, inputs, rank, scale)
        times.append(seconds)
        score = mean(normalised(evaluator.accuracies(deltas, "val"), own["val"]))
        curve[str(scale)] = score
        if best is None or score > best[0]:
            best = (score, scale, deltas)
    assert best is not None
    test = evaluator.accuracies(best[2], "test")
    norm = normalised(test, own["test"])
    return {"method": m.label, "rank": rank, "scale": best[1], "val_curve": curve,
            "test_accuracy": test, "normalised": norm, "mean_normalised": mean(norm),
            "merge_s": statistics.median(times)}


def run_seed(cfg: QualityConfig, base: torch.nn.Module, seed: int, methods: Sequence[Method],
             workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train T adapters for this seed's tasks, then merge and score every method/rank."""
    suite = make_tasks(cfg, seed)
    started = time.perf_counter()
    adapters = [train_adapter(base, suite, t, cfg, seed, workdir / f"seed{seed}-task{t}")
                for t in range(cfg.tasks)]
    train_s = time.perf_counter() - started
    evaluator = Evaluator(base, suite, cfg.lora_targets)
    own_deltas = [read_deltas(a) for a in adapters]
    own = {split: [evaluator.accuracies(d, split)[t] for t, d in enumerate(own_deltas)]
           for split in ("val", "test")}
    base_acc = {split: evaluator.accuracies({}, split) for split in ("val", "test")}
    log(f"seed {seed}: adapters trained in {train_s:.0f}s; own test acc "
        f"{mean(own['test']):.3f}, base {mean(base_acc['test']):.3f}")
    inputs = MergeInputs(
        adapters=adapters, density=cfg.density, seed=seed, workdir=workdir,
        stack={name: torch.stack([d[name] for d in own_deltas]) for name in own_deltas[0]})
    runs = []
    for m in methods:
        for rank in (cfg.ranks if m.ranked else (None,)):
            run = run_method(m, rank, inputs, evaluator, own, cfg.scales)
            runs.append(run)
            log(f"  {m.label:<13} r={rank!s:<4} λ={run['scale']:<4} "
                f"norm acc {run['mean_normalised']:.3f}  merge {1e3 * run['merge_s']:.0f} ms")
    return {"seed": seed, "adapter_train_s": train_s, "own": own, "base": base_acc,
            "base_normalised": mean(normalised(base_acc["test"], own["test"])), "runs": runs}


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


REFERENCE = "mtc-ta"    # ranked methods are also compared with it, paired by seed and rank


def summarize(per_seed: Sequence[dict[str, Any]], methods: Sequence[Method],
              cfg: QualityConfig) -> list[dict[str, Any]]:
    """Per (method, rank): mean ± sd over seeds of the mean normalised test accuracy, and
    for ranked methods the paired per-seed difference to REFERENCE at the same rank."""
    score = {(r["method"], r["rank"], s["seed"]): r["mean_normalised"]
             for s in per_seed for r in s["runs"]}
    rows = []
    for m in methods:
        for rank in (cfg.ranks if m.ranked else (None,)):
            runs = [r for s in per_seed for r in s["runs"]
                    if r["method"] == m.label and r["rank"] == rank]
            values = [r["mean_normalised"] for r in runs]
            per_task = [mean([r["normalised"][t] for r in runs]) for t in range(cfg.tasks)]
            output_rank = rank if m.ranked else (
                cfg.tasks * cfg.lora_rank if m.method == "cat" else "full")
            row: dict[str, Any] = {
                "method": m.label, "rank": rank, "output_rank": output_rank,
                "mean": mean(values), "sd": _sd(values), "scales": [r["scale"] for r in runs],
                "per_task": per_task, "merge_ms": 1e3 * mean([r["merge_s"] for r in runs])}
            if m.ranked and all((REFERENCE, rank, seed) in score for seed in cfg.seeds):
                diffs = [score[(m.label, rank, seed)] - score[(REFERENCE, rank, seed)]
                         for seed in cfg.seeds]
                row["vs_reference"] = {"mean": mean(diffs), "sd": _sd(diffs)}
            rows.append(row)
    return rows


def public_accuracy(base: torch.nn.Module, cfg: QualityConfig) -> list[float]:
    """The base model's accuracy per skill on fresh public-corpus questions."""
    vocab = Vocab(cfg.tasks, cfg.domain)
    gen = torch.Generator().manual_seed(cfg.base_seed + 1)
    out = []
    with torch.no_grad():
        for s in range(cfg.tasks):
            x = torch.randint(0, cfg.domain, (512, 3), generator=gen)
            dom = torch.randint(0, cfg.tasks, (512,), generator=gen)
            y = skill_answers(x, cfg.domain)[:, s]
            rows = sequences(vocab, torch.full((512,), s), dom, x, y)
            out.append(float((answer_logits(base, rows).argmax(-1) == rows[:, -1]).float().mean()))
    return out


def run_benchmark(cfg: QualityConfig, command: str, *, workdir: Path | None = None,
                  methods: Sequence[Method] | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole run: pretrain once, then per seed adapters + every merge. JSON-ready."""
    cfg.check()
    methods = tuple(methods or default_methods())
    torch.set_num_threads(cfg.threads)
    load_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="merge-quality-", dir=workdir) as tmp:
        base = pretrain_base(cfg)
        pretrain_s = time.perf_counter() - started
        public = public_accuracy(base, cfg)
        log(f"base pretrained in {pretrain_s:.0f}s; public-corpus accuracy {mean(public):.3f}")
        per_seed = [run_seed(cfg, base, seed, methods, Path(tmp), log) for seed in cfg.seeds]
    return {
        "benchmark": "merge_quality", "command": command, "config": asdict(cfg),
        "skills": list(SKILL_NAMES[:cfg.tasks]), "machine": machine_info(cfg.threads),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "wall_s": time.perf_counter() - started, "pretrain_s": pretrain_s,
        "base_public_accuracy": public,
        "own_test_accuracy": mean([mean(s["own"]["test"]) for s in per_seed]),
        "base_test_accuracy": mean([mean(s["base"]["test"]) for s in per_seed]),
        "base_normalised": mean([s["base_normalised"] for s in per_seed]),
        "summary": summarize(per_seed, methods, cfg), "seeds": per_seed,
    }


# ----------------------------------------------------------------------------- output

def _cell(row: dict[str, Any] | None) -> str:
    return "—" if row is None else f"{row['mean']:.3f} ± {row['sd']:.3f}"


def render(result: dict[str, Any]) -> str:
    """Markdown: normalised accuracy per method and rank, chosen λ, merge time."""
    cfg = result["config"]
    ranks = cfg["ranks"]
    by_method: dict[str, dict[Any, dict[str, Any]]] = {}
    for row in result["summary"]:
        by_method.setdefault(row["method"], {})[row["rank"]] = row
    head = ["method", *[f"r = {r}" for r in ranks], "no rank limit",
            "λ chosen (seeds " + "/".join(map(str, cfg["seeds"]))
            + ("; r = " + "; ".join(map(str, ranks)) if ranks else "") + ")", "merge ms"]
    lines = [
        f"Normalised test accuracy (merged / own adapter, mean over {cfg['tasks']} tasks), "
        f"mean ± sd over seeds {', '.join(map(str, cfg['seeds']))}. Own adapters: "
        f"{result['own_test_accuracy']:.3f} mean test accuracy; base model: "
        f"{result['base_test_accuracy']:.3f} (normalised {result['base_normalised']:.3f}).",
        "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, rows in by_method.items():
        unranked = rows.get(None)
        scales = "; ".join("/".join(f"{s:g}" for s in row["scales"]) for row in rows.values())
        merge_ms = "; ".join(f"{row['merge_ms']:.0f}" for row in rows.values())
        label = method + (f" (rank {unranked['output_rank']})" if unranked
                          and isinstance(unranked["output_rank"], int) else "")
        cells = [_cell(rows.get(r)) for r in ranks]
        lines.append(f"| {label} | " + " | ".join([*cells, _cell(unranked), scales, merge_ms])
                     + " |")
    paired = {m: rows for m, rows in by_method.items()
              if m != REFERENCE and any("vs_reference" in r for r in rows.values())}
    if paired:
        lines += ["", f"Paired difference to {REFERENCE} at the same rank (same adapters, "
                  "per seed), mean ± sd over seeds:", "",
                  "| method | " + " | ".join(f"r = {r}" for r in ranks) + " |",
                  "|" + "---|" * (len(ranks) + 1)]
        for method, rows in paired.items():
            cells = [f"{rows[r]['vs_reference']['mean']:+.3f} ± "
                     f"{rows[r]['vs_reference']['sd']:.3f}" for r in ranks]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


RULE_COLOURS = {"ta": "tab:blue", "ties": "tab:orange", "dare": "tab:green", "iso": "tab:red"}
FAMILY_STYLES = {"mtc": ("s", ":"), "ctm": ("o", "-"), "ctm-bal": ("o", "--"),
                 "core": ("^", "-."), "full": ("", ":"), "cat": ("", "-.")}


def line_style(label: str) -> tuple[str, str, str]:
    """(colour, marker, linestyle) of a method label: colour by rule, style by method."""
    family, _, rest = label.partition("-")
    rule = rest.removesuffix("-bal") or "ta"
    key = f"{family}-bal" if label.endswith("-bal") else family
    marker, style = FAMILY_STYLES.get(key, ("o", "-"))
    return RULE_COLOURS.get(rule, "black"), marker, style


def plot(result: dict[str, Any], path: Path) -> None:
    """Normalised accuracy against output rank: one line per ranked method, references flat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = result["config"]["ranks"]
    fig, ax = plt.subplots(figsize=(9, 6))
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in result["summary"]:
        lines.setdefault(row["method"], []).append(row)
    ranked = [m for m, rows in lines.items() if rows[0]["rank"] is not None]
    for method, rows in lines.items():
        colour, marker, style = line_style(method)
        if rows[0]["rank"] is None:
            ax.axhline(rows[0]["mean"], color=colour, linestyle=style, linewidth=1.2,
                       label=f"{method} (no rank limit)")
            continue
        # spread the error bars a little along x so that they stay readable
        shift = 1.0 + 0.012 * (ranked.index(method) - (len(ranked) - 1) / 2)
        ax.errorbar([r["rank"] * shift for r in rows], [r["mean"] for r in rows],
                    yerr=[r["sd"] for r in rows], color=colour, linestyle=style,
                    marker=marker, markersize=5, capsize=2, linewidth=1.3, label=method)
    ax.axhline(result["base_normalised"], color="grey", linewidth=1, label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("output rank r")
    ax.set_ylabel("normalised accuracy (merged / own adapter)")
    cfg = result["config"]
    ax.set_title(f"Merging {cfg['tasks']} rank-{cfg['lora_rank']} LoRAs (colour: rule; "
                 f"style: method); mean ± sd over {len(cfg['seeds'])} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (T=3, one seed); prints the table, writes nothing")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1), default 3")
    parser.add_argument("--threads", type=int, help="torch threads, default 1")
    parser.add_argument("--lora-steps", type=int, help="training steps per adapter")
    parser.add_argument("--out-dir", type=Path, default=RESULTS,
                        help="where merge_quality.{json,md,png} go (full run only)")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> QualityConfig:
    cfg = QUICK if args.quick else FULL
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit("--seeds must be at least 1")
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.threads is not None:
        cfg = replace(cfg, threads=max(1, args.threads))
    if args.lora_steps is not None:
        cfg = replace(cfg, lora_steps=args.lora_steps)
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = config_from(args)
    command = shlex.join([".venv/bin/python", "bench/merge_quality.py",
                          *(sys.argv[1:] if argv is None else argv)])
    result = run_benchmark(cfg, command)
    table = render(result)
    print(table)
    print(f"wall time {result['wall_s']:.0f}s (pretraining {result['pretrain_s']:.0f}s); "
          f"load average {result['load_average']}")
    if args.quick:
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "merge_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / "merge_quality.md").write_text(f"# Merge quality\n\n`{command}`\n\n{table}")
    plot(result, args.out_dir / "merge_quality.png")
    print(f"wrote {args.out_dir}/merge_quality.{{json,md,png}}")


if __name__ == "__main__":
    main()
