"""The toy world as text, for `lorafold.tune`: a word-level tokenizer whose ids are the toy
vocabulary's, the base model saved with it, and each task's split as a JSONL-style set.

A toy row ``BOS tag x1 x2 x3 = y`` becomes the prompt ``"t<tag> d<d>_<x1> d<d>_<x2>
d<d>_<x3> ="`` and the completion ``"d<d>_<y>"``; the tokenizer adds BOS, so the encoded
prompt + completion is the toy row itself and the validation NLL is the answer's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from toy_world import TaskSuite, Vocab

from lorafold.unlearn.datasets import TextDataset


def words(vocab: Vocab) -> list[str]:
    """The word of every toy token id, in id order."""
    out = ["[BOS]", "="] + [f"t{t}" for t in range(vocab.tasks)]
    out += [f"d{d}_{x}" for d in range(vocab.tasks) for x in range(vocab.domain)]
    assert len(out) == vocab.size
    return out


def tokenizer_for(vocab: Vocab) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(words(vocab))}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="[BOS]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A",
                                                       special_tokens=[("[BOS]", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]")


def save_base(base: torch.nn.Module, vocab: Vocab, directory: Path) -> Path:
    """The base model and its tokenizer as a local model directory."""
    base.save_pretrained(str(directory))  # type: ignore[operator]
    tokenizer_for(vocab).save_pretrained(str(directory))
    return directory


def task_sets(suite: TaskSuite, split: str) -> list[TextDataset]:
    """One set per task: its rows of `split` as prompt/completion text."""
    names = words(suite.vocab)
    sets = []
    for t, x in enumerate(suite.splits[split]):
        rows = suite.examples(t, x).tolist()
        pairs = [(" ".join(names[i] for i in row[1:-1]), names[row[-1]]) for row in rows]
        sets.append(TextDataset.from_pairs(pairs, name=f"task{t}-{split}"))
    return sets
