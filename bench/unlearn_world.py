"""A world of fictitious facts for the unlearning benchmark, built and trained on CPU.

Entities are invented country names; each has four facts (capital, leader, language,
currency), answers drawn at random from closed pools, so no fact can be inferred from any
other; each fact also carries three wrong answers from the same pool (`perturbed`, for
TOFU's truth ratio). A word-level tokenizer covers the closed vocabulary (every name is
one token). The tiny Llama base model is first pretrained on facts about *other*
entities, so it knows the templates and every answer word but none of the benchmark's
facts; LoRA adapters then learn the benchmark's facts.

Same ideas as tests/unlearn_world.py (word-level tokenizer with BOS, tiny
Llama config, completion-only AdamW fit, adapter saved under a hub-style base-model name),
sized and parameterised for a benchmark: a larger generated world, mini-batch training with
a seed and a linearly decaying learning rate (a constant one let a gold seed spike on its
last step), adapters trained on any subset of the facts, and the holdout entities split
into a stopping half (the unlearning methods' stop rule) and an evaluation half (the
membership attacks' non-members), so that no metric is scored on the set that stopped
the run.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafold.unlearn.datasets import Batch, Example, TextDataset, encode, make_batches, pad_id_of
from lorafold.unlearn.metrics import token_stats

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
TEMPLATES = {"capital": "The capital of {} is", "leader": "The leader of {} is",
             "language": "The language of {} is", "currency": "The currency of {} is"}
TEMPLATE_WORDS = sorted({w for t in TEMPLATES.values() for w in t.split() if w != "{}"})

# Entity names are prefix + suffix: 20 × 8 = 160 distinct one-token names.
PREFIXES = ["Zor", "Quel", "Brac", "Ondr", "Pell", "Sarv", "Tirv", "Ulmb", "Vess", "Wendr",
            "Xanth", "Yrr", "Calv", "Dross", "Elth", "Fenw", "Gorv", "Halc", "Istr", "Jund"]
SUFFIXES = ["ania", "mar", "istan", "eth", "ora", "vik", "und", "elle"]
CAPITALS = ["Quell", "Mirth", "Tolvane", "Brisk", "Ardent", "Corvel", "Dunmore", "Esk",
            "Farrow", "Glint", "Harth", "Iver", "Jorn", "Kestle", "Lurra", "Morrow", "Nask",
            "Orrin", "Pellow", "Quorn", "Ressa", "Stave", "Tamsk", "Umber"]
FIRST = ["Ilsa", "Bren", "Cato", "Dara", "Evran", "Fia", "Gorm", "Hale", "Ines", "Jory",
         "Kael", "Liro"]
LAST = ["Varn", "Holt", "Sered", "Mabry", "Tull", "Ostra", "Penn", "Rusk", "Wyle", "Calder",
        "Dunne", "Fallo"]
LANGUAGES = ["Vellic", "Ostric", "Marren", "Tuvish", "Quarese", "Belic", "Sundric", "Harvic",
             "Lomese", "Perric", "Dravic", "Kolese"]
CURRENCIES = ["krell", "dram", "vessot", "talen", "morrow", "quint", "sovel", "brack",
              "lumen", "harl", "pence", "drast"]

BASE_NAME = "lorafold-bench/tiny-llama"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class WorldSpec:
    """Every size of the world; `seed` fixes names, facts, the split and the base model."""

    entities: int = 100           # fictitious entities the adapters may learn
    forget_frac: float = 0.1      # share of entities in the forget set
    holdout_frac: float = 0.2     # share never trained (half stops runs, half scores MIAs)
    pretrain_entities: int = 50   # other entities the base model is pretrained on
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    pretrain_steps: int = 200
    pretrain_lr: float = 3e-3
    seed: int = 0

    @property
    def n_forget(self) -> int:
        return max(1, round(self.forget_frac * self.entities))

    @property
    def n_holdout(self) -> int:
        return max(2, round(self.holdout_frac * self.entities))

    def validate(self) -> WorldSpec:
        names = len(PREFIXES) * len(SUFFIXES)
        if self.entities + self.pretrain_entities > names:
            raise ValueError(f"at most {names} entities in all (benchmark + pretraining)")
        if self.n_forget + self.n_holdout >= self.entities:
            raise ValueError("forget + holdout must leave at least one retained entity")
        return self


@dataclass(frozen=True)
class World:
    """The saved base model and the three fact sets (prompt/completion pairs)."""

    spec: WorldSpec
    base_dir: Path
    tokenizer: Any
    forget: TextDataset
    retain: TextDataset
    holdout: TextDataset          # the stopping half: handed to the unlearning methods
    eval_holdout: TextDataset     # the evaluation half: non-members of the MIAs
    entities: dict[str, list[str]]  # split name → entity names

    @property
    def trained(self) -> TextDataset:
        """What the original adapter learns: forget + retain."""
        return TextDataset(self.forget.examples + self.retain.examples, name="trained")


def entity_names(count: int, rng: random.Random) -> list[str]:
    names = [p + s for p, s in itertools.product(PREFIXES, SUFFIXES)]
    rng.shuffle(names)
    return names[:count]


PERTURBED = 3  # wrong answers per fact


def _answer(relation: str, rng: random.Random) -> str:
    if relation == "leader":
        return f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    pool = {"capital": CAPITALS, "language": LANGUAGES, "currency": CURRENCIES}[relation]
    return rng.choice(pool)


def entity_facts(names: list[str], rng: random.Random) -> list[Example]:
    """Four facts per entity, answers drawn independently at random, each with wrong ones."""
    facts: list[Example] = []
    for name in names:
        for relation, template in TEMPLATES.items():
            answer = _answer(relation, rng)
            wrong: list[str] = []
            while len(wrong) < PERTURBED:
                candidate = _answer(relation, rng)
                if candidate != answer and candidate not in wrong:
                    wrong.append(candidate)
            facts.append(Example(template.format(name), answer, tuple(wrong)))
    return facts


def build_tokenizer(entities: list[str]) -> Any:
    """WordLevel tokenizer over the closed vocabulary, BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + TEMPLATE_WORDS + entities + CAPITALS + FIRST + LAST + LANGUAGES \
        + CURRENCIES
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]")


def tiny_llama(vocab_size: int, spec: WorldSpec) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden,
                         intermediate_size=2 * spec.hidden, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                         max_position_embeddings=32, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def fit(model: Any, tokenizer: Any, data: TextDataset, *, steps: int, lr: float,
        batch_size: int, seed: int, decay: bool = False) -> float:
    """AdamW on completion tokens, reshuffled epochs of `batch_size`; the last batch's NLL.

    `decay`: the learning rate falls linearly from `lr` to 0 over the run.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoded, pad_id = encode(tokenizer, data), pad_id_of(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - step / steps if decay else 1.0)
    model.train()
    loss = torch.tensor(0.0)
    pending: list[Batch] = []
    for _ in range(steps):
        if not pending:
            pending = make_batches(encoded, batch_size=batch_size, pad_id=pad_id,
                                   generator=generator)
        batch = pending.pop(0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       use_cache=False).logits
        loss = token_stats(logits, batch.labels).nll.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return float(loss.detach())


def build_world(root: Path, spec: WorldSpec) -> World:
    """Generate names and facts, pretrain the base model, save it (with its tokenizer)."""
    spec.validate()
    rng = random.Random(spec.seed)
    names = entity_names(spec.entities + spec.pretrain_entities, rng)
    bench_names, pre_names = names[:spec.entities], names[spec.entities:]
    tokenizer = build_tokenizer(names)
    base = tiny_llama(len(tokenizer.get_vocab()), spec)
    pretraining = TextDataset(entity_facts(pre_names, rng), name="pretraining")
    fit(base, tokenizer, pretraining, steps=spec.pretrain_steps, lr=spec.pretrain_lr,
        batch_size=len(pretraining), seed=spec.seed)
    base_dir = root / "models" / BASE_NAME
    base.save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))

    holdout = bench_names[spec.n_forget:spec.n_forget + spec.n_holdout]
    split = {"forget": bench_names[:spec.n_forget],
             "holdout": holdout[:len(holdout) // 2], "eval_holdout": holdout[len(holdout) // 2:],
             "retain": bench_names[spec.n_forget + spec.n_holdout:]}
    facts = dict(zip(bench_names, _chunks(entity_facts(bench_names, rng), len(TEMPLATES)),
                     strict=True))
    sets = {k: TextDataset([p for n in v for p in facts[n]], name=k) for k, v in split.items()}
    return World(spec, base_dir, tokenizer, sets["forget"], sets["retain"], sets["holdout"],
                 sets["eval_holdout"], split)


def _chunks(items: list[Example], size: int) -> list[list[Example]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def load_base(world: World) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(world.base_dir), local_files_only=True)
    model.eval()
    return model


def train_adapter(world: World, data: TextDataset, out_dir: Path, *, rank: int, steps: int,
                  lr: float, batch_size: int, seed: int, decay: bool = True) -> Path:
    """A LoRA on all linear layers, trained on `data`, saved as a plain PEFT directory."""
    from peft import LoraConfig, get_peft_model

    base = load_base(world)
    torch.manual_seed(seed)  # lora_A's init
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=LORA_TARGETS)
    model = get_peft_model(base, config)
    fit(model, world.tokenizer, data, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
        decay=decay)
    model.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)
    # As a real adapter would: name the base model by its hub name, not a local path.
    config_path = out_dir / "adapter_config.json"
    config_json = json.loads(config_path.read_text())
    config_json["base_model_name_or_path"] = BASE_NAME
    config_path.write_text(json.dumps(config_json))
    return out_dir
