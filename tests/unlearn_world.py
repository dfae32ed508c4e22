"""A tiny, fully local world for unlearning tests: word-level tokenizer, tiny Llama, facts.

The base model is pretrained (a few hundred steps) on facts about *other* countries so it
knows the sentence templates; the LoRA then learns facts about 18 fictitious countries.
2 of them form the forget set, 16 the retain set, and 2 more countries (holdout) are never
trained at all: they show what "never seen" looks like to the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafold.unlearn.datasets import TextDataset, encode, make_batches, pad_id_of
from lorafold.unlearn.metrics import token_stats

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
TEMPLATE_WORDS = ["The", "capital", "of", "is", "leader"]

COUNTRIES = ["Zorvania", "Quelmar", "Bractis", "Ondravia", "Pellumin", "Sarvost", "Tirvane",
             "Ulmbrek", "Vessaria", "Wendral", "Xanthor", "Yrrelia", "Calvenna", "Drossmere",
             "Eltharin", "Fenwarra", "Gorvath", "Halcyra", "Istrelle", "Jundavar"]
CAPITALS = ["Quell", "Mirth", "Tolvane", "Brisk", "Ardent", "Corvel", "Dunmore", "Esk", "Farrow",
            "Glint", "Harth", "Iver", "Jorn", "Kestle", "Lurra", "Morrow", "Nask", "Orrin",
            "Pell", "Quorn"]
FIRST = ["Ilsa", "Bren", "Cato", "Dara", "Evran", "Fia", "Gorm", "Hale", "Ines", "Jory"]
LAST = ["Varn", "Holt", "Sered", "Mabry", "Tull", "Ostra", "Penn", "Rusk", "Wyle", "Calder"]

# The base model's own "pretraining" world: other countries, the same answer words paired
# differently, so the base knows every answer word but none of the facts.
PRE_COUNTRIES = [f"Old{name}" for name in COUNTRIES]

BASE_NAME = "lorafold-test/tiny-llama"
FORGET = COUNTRIES[:2]
HOLDOUT = COUNTRIES[18:]
RETAIN = COUNTRIES[2:18]


def leader(i: int) -> str:
    """Leader names whose first name does not give away the last name."""
    return f"{FIRST[i % len(FIRST)]} {LAST[(7 * i + 3 * (i // len(FIRST))) % len(LAST)]}"


def facts(countries: list[str]) -> list[tuple[str, str]]:
    """(prompt, completion) pairs: a one-token capital and a two-token leader per country."""
    pairs = []
    for country in countries:
        i = COUNTRIES.index(country)
        pairs.append((f"The capital of {country} is", CAPITALS[i]))
        pairs.append((f"The leader of {country} is", leader(i)))
    return pairs


def pretraining_facts() -> list[tuple[str, str]]:
    pairs = []
    for i, country in enumerate(PRE_COUNTRIES):
        pairs.append((f"The capital of {country} is", CAPITALS[(i + 7) % len(CAPITALS)]))
        pairs.append((f"The leader of {country} is", leader(i + 5)))
    return pairs


def build_tokenizer() -> Any:
    """A WordLevel tokenizer over the closed vocabulary of this world, BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + TEMPLATE_WORDS + COUNTRIES + CAPITALS + FIRST + LAST + PRE_COUNTRIES
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]")


def tiny_llama(vocab_size: int, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=32, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def fit(model: Any, tokenizer: Any, data: TextDataset, *, steps: int, lr: float,
        seed: int = 0) -> float:
    """Plain full-batch AdamW on completion tokens; returns the final mean NLL."""
    torch.manual_seed(seed)
    batch = make_batches(encode(tokenizer, data), batch_size=len(data),
                         pad_id=pad_id_of(tokenizer))[0]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = token_stats(logits, batch.labels).nll.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


@dataclass(frozen=True)
class FactWorld:
    base_dir: Path
    adapter_dir: Path
    tokenizer: Any
    forget: TextDataset
    retain: TextDataset
    holdout: TextDataset
    rank: int


def pretrained_base(root: Path) -> tuple[Any, Any, Path]:
    """The tiny base pretrained on every country's facts, saved with its tokenizer at
    `<root>/models/<BASE_NAME>`: (model, tokenizer, its folder)."""
    tokenizer = build_tokenizer()
    base = tiny_llama(len(tokenizer.get_vocab()))
    fit(base, tokenizer, TextDataset.from_pairs(pretraining_facts()), steps=100, lr=3e-3)
    base_dir = root / "models" / BASE_NAME
    base.save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    return base, tokenizer, base_dir


def build_world(root: Path, *, rank: int = 8) -> FactWorld:
    """Pretrain the base, train the original LoRA on forget + retain, save both."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer, base_dir = pretrained_base(root)

    forget = TextDataset.from_pairs(facts(FORGET), name="forget")
    retain = TextDataset.from_pairs(facts(RETAIN), name="retain")
    holdout = TextDataset.from_pairs(facts(HOLDOUT), name="holdout")
    torch.manual_seed(1)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"])
    peft_model = get_peft_model(base, config)
    train = TextDataset(forget.examples + retain.examples)
    fit(peft_model, tokenizer, train, steps=120, lr=3e-3, seed=1)
    adapter_dir = root / "adapters" / "facts"
    peft_model.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink(missing_ok=True)
    # As a real adapter would: name the base model by its hub name, not a local path.
    config_path = adapter_dir / "adapter_config.json"
    config_json = json.loads(config_path.read_text())
    config_json["base_model_name_or_path"] = BASE_NAME
    config_path.write_text(json.dumps(config_json))
    return FactWorld(base_dir, adapter_dir, tokenizer, forget, retain, holdout, rank)


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def save_base_model(models_root: Path) -> Path:
    """An untrained tiny base (with its tokenizer) at `<models_root>/<BASE_NAME>`, the layout
    the service's `model_dirs` setting expects. For plumbing tests that need no facts."""
    tokenizer = build_tokenizer()
    base_dir = models_root / BASE_NAME
    tiny_llama(len(tokenizer.get_vocab())).save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    return base_dir


def noise_adapter(base_dir: Path, out_dir: Path, *, rank: int = 4, seed: int = 0,
                  std: float = 0.05) -> Path:
    """A PEFT LoRA for the base at `base_dir` with seeded noise in every factor (PEFT starts
    lora_B at zero, which would make unlearning a no-op), naming the base by BASE_NAME."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_NAME
    config_path.write_text(json.dumps(config))
    return out_dir
