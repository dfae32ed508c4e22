"""The toy world of the merge-quality benchmark: a tiny Llama that knows every public skill,
and T private tasks whose answers are secret re-keyings of them.

A shared vocabulary holds BOS, "=", T task tags and T disjoint domains of K tokens. A
sequence reads ``BOS <tag_t> x1 x2 x3 = y`` with x1..x3 from domain t and y in domain t.
Skill t is a function of (x1, x2, x3) (first, last, max, min, median, first+1, second,
last−1, in that order). The public corpus pairs tag t with skill t on *every* domain, so the
base model knows every question. Task t asks for a secret re-keying of the answer:
y = π_t(skill_t(x)) with π_t a random permutation of domain t. The base model therefore
answers the public key (right only where π_t has a fixed point), its own adapter learns π_t,
and merged adapters must keep T permutations on disjoint token ranges at once.

`spread` gives the tasks' adapters different training recipes, interpolated between a
gentle one (small LoRA α, weight decay) and an aggressive one (large α, more steps, loss on
down-scaled logits, i.e. over-trained to large margins): every adapter still learns its
task, but their deltas' norms spread over ≥ 10×, the regime the CtM paper's rescaling β is
for, where a few large-norm adapters would otherwise take the whole rank budget. (Scaling
a trained adapter's delta instead is no model of this: at 0.5× or 2× the toy adapters lose
most of their accuracy.)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

BASE_NAME = "lorafold-bench/merge-quality-base"
SKILL_NAMES = ("first", "last", "max", "min", "median", "first+1", "second", "last-1")


@dataclass(frozen=True)
class ToyConfig:
    """Every size of one toy world (all of it lands in the JSON)."""

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
    spread: bool = False              # tasks' recipes interpolated GENTLE → AGGRESSIVE
    val_per_task: int = 96            # held-out inputs per task (of K³), picks λ
    test_per_task: int = 160          # held-out inputs per task (of K³), reported
    base_seed: int = 1234             # the base model is pretrained once per run

    def check(self) -> None:
        if not 1 <= self.tasks <= len(SKILL_NAMES):
            raise ValueError(f"tasks must be in 1..{len(SKILL_NAMES)}")
        if self.val_per_task + self.test_per_task >= self.domain ** 3:
            raise ValueError("val + test must leave training inputs (domain³ in all)")


@dataclass(frozen=True)
class Recipe:
    """How one adapter is trained."""

    alpha: float
    lr: float
    steps: int
    weight_decay: float = 0.0
    logit_scale: float = 1.0          # the loss sees logits × this (< 1: larger margins)


# The ends of the spread regime, measured on the full-size toy (task 1, seed 0): GENTLE
# gives a delta norm of 5.4 at test accuracy 1.00, AGGRESSIVE one of 54.7 at 1.00.
GENTLE = Recipe(alpha=2.0, lr=3e-3, steps=600, weight_decay=2.0)
AGGRESSIVE = Recipe(alpha=512.0, lr=3e-3, steps=1000, logit_scale=0.05)

TOY = ToyConfig()
TOY_SPREAD = replace(TOY, spread=True)
TOY_QUICK = replace(TOY, tasks=3, domain=8, hidden=64, intermediate=128, heads=2,
                    pretrain_steps=300, lora_steps=120, lora_lr=3e-3, val_per_task=64,
                    test_per_task=128)
TOY_QUICK_SPREAD = replace(TOY_QUICK, spread=True)


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


def make_tasks(cfg: ToyConfig, seed: int) -> TaskSuite:
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


def answer_loss(model: torch.nn.Module, rows: torch.Tensor,
                logit_scale: float = 1.0) -> torch.Tensor:
    return F.cross_entropy(answer_logits(model, rows) * logit_scale, rows[:, -1])


def fit(model: torch.nn.Module, params: Sequence[torch.nn.Parameter],
        batches: Callable[[], torch.Tensor], *, steps: int, lr: float,
        weight_decay: float = 0.0, logit_scale: float = 1.0) -> float:
    """AdamW with a one-cycle schedule on the answer loss; returns the last loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(steps):
        loss = answer_loss(model, batches(), logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def base_key(cfg: ToyConfig) -> tuple[object, ...]:
    """What the pretrained base depends on: configs equal here share one base model."""
    return (cfg.tasks, cfg.domain, cfg.hidden, cfg.intermediate, cfg.layers, cfg.heads,
            cfg.pretrain_steps, cfg.pretrain_lr, cfg.batch, cfg.base_seed)


def pretrain_base(cfg: ToyConfig) -> torch.nn.Module:
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


def plain_recipe(cfg: ToyConfig) -> Recipe:
    """The config's own recipe: lora_alpha, lora_lr, lora_steps."""
    return Recipe(alpha=float(cfg.lora_alpha), lr=cfg.lora_lr, steps=cfg.lora_steps)


def task_settings(cfg: ToyConfig, seed: int) -> list[Recipe]:
    """Each task's training recipe: the config's own, or (spread) GENTLE to AGGRESSIVE in
    even steps (α and lr geometric, the rest linear), in an order drawn from the seed so
    that no skill is always the largest."""
    plain = plain_recipe(cfg)
    if not cfg.spread or cfg.tasks == 1:
        return [plain] * cfg.tasks
    order = torch.randperm(cfg.tasks, generator=torch.Generator().manual_seed(30_000 + seed))
    steps = cfg.lora_steps / TOY.lora_steps                 # quick configs train less

    def at(u: float) -> Recipe:
        def geo(a: float, b: float) -> float:
            return float(a ** (1 - u) * b ** u)

        def lin(a: float, b: float) -> float:
            return (1 - u) * a + u * b

        return Recipe(alpha=geo(GENTLE.alpha, AGGRESSIVE.alpha), lr=geo(GENTLE.lr, AGGRESSIVE.lr),
                      steps=max(1, round(steps * lin(GENTLE.steps, AGGRESSIVE.steps))),
                      weight_decay=lin(GENTLE.weight_decay, AGGRESSIVE.weight_decay),
                      logit_scale=geo(GENTLE.logit_scale, AGGRESSIVE.logit_scale))

    return [at(float(order[t]) / (cfg.tasks - 1)) for t in range(cfg.tasks)]


def train_adapter(base: torch.nn.Module, suite: TaskSuite, t: int, cfg: ToyConfig,
                  seed: int, out_dir: Path, recipe: Recipe | None = None) -> Path:
    """One rank-r LoRA on task t (base frozen), written with PEFT's save_pretrained."""
    from peft import LoraConfig, get_peft_model

    recipe = recipe or plain_recipe(cfg)
    torch.manual_seed(seed * 1_000 + t)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                      target_modules=list(cfg.lora_targets), bias="none")
    model = get_peft_model(base, lora)
    train = suite.splits["train"][t]
    gen = torch.Generator().manual_seed(20_000 + seed * 1_000 + t)

    def batch() -> torch.Tensor:
        return suite.examples(t, train[torch.randint(0, len(train), (cfg.batch,),
                                                     generator=gen)])

    params = [p for p in model.parameters() if p.requires_grad]
    fit(model, params, batch, steps=recipe.steps, lr=recipe.lr,
        weight_decay=recipe.weight_decay, logit_scale=recipe.logit_scale)
    model.save_pretrained(str(out_dir), save_embedding_layers=False)   # no hub lookup
    model.unload()                             # strip the LoRA layers off `base` again
    return out_dir


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




@dataclass
class ToyWorld:
    """One seed's adapters (one per task) and the evaluator that scores merges of them."""

    adapters: list[Path]
    evaluator: Evaluator
    train_s: float
    suite: TaskSuite


def build_world(cfg: ToyConfig, seed: int, workdir: Path, base: torch.nn.Module) -> ToyWorld:
    """This seed's tasks, and one adapter per task trained on `base` (left unchanged)."""
    suite = make_tasks(cfg, seed)
    started = time.perf_counter()
    adapters = [train_adapter(base, suite, t, cfg, seed, workdir / f"seed{seed}-task{t}", recipe)
                for t, recipe in enumerate(task_settings(cfg, seed))]
    return ToyWorld(adapters=adapters, evaluator=Evaluator(base, suite, cfg.lora_targets),
                    train_s=time.perf_counter() - started, suite=suite)
