"""Unlearning data sets: JSONL parsed as a stream, validated line by line, then tokenised.

A record is ``{"text": str}`` (every token is a target) or ``{"prompt": str, "completion":
str}`` (only the completion's tokens are targets). Prompt and completion stay apart so that
NLL and token accuracy are measured on what the model is asked to produce, never on the
question. A prompt/completion record may also carry ``"perturbed": [str, ...]``: 1 to
MAX_PERTURBED wrong answers to the same prompt, for TOFU's truth ratio (does the model still
prefer the true answer?). Other keys (ids, metadata) are ignored. Every refusal is an
`InvalidDataset` whose code says what went wrong and whose message names the 1-based line
number.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import torch

from lorafold.errors import InvalidDataset, PayloadTooLarge

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_LINE_BYTES = 1024 * 1024
_CHUNK = 64 * 1024
IGNORE_INDEX = -100  # label value that torch's cross-entropy (and ours) skips
MAX_PERTURBED = 32  # wrong answers per record: each costs one more forward pass


@dataclass(frozen=True)
class Example:
    """One record; ``prompt`` is empty for plain-text records, ``perturbed`` holds wrong
    answers to the prompt (empty when the record gives none)."""

    prompt: str
    completion: str
    perturbed: tuple[str, ...] = ()


@dataclass
class TextDataset:
    """An ordered list of examples (held in memory: unlearning sets are facts, not corpora)."""

    examples: list[Example] = field(default_factory=list)
    name: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def fingerprint(self) -> str:
        """sha256 of the records, for lineage: which data an adapter was unlearned with.

        Each record adds ``json.dumps([prompt, completion])`` in UTF-8 and a newline, with
        ``list(perturbed)`` as a third item only where it has some: data without perturbed
        answers hashes exactly as before they existed, so old jobs' lineage still matches.
        """
        digest = hashlib.sha256()
        for example in self.examples:
            fields: list[Any] = [example.prompt, example.completion]
            if example.perturbed:
                fields.append(list(example.perturbed))
            digest.update(json.dumps(fields).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], *, name: str = "") -> TextDataset:
        return cls([Example(p, c) for p, c in pairs], name=name)

    @classmethod
    def from_texts(cls, texts: Iterable[str], *, name: str = "") -> TextDataset:
        return cls([Example("", t) for t in texts], name=name)


def _invalid(code: str, line: int, message: str) -> InvalidDataset:
    return InvalidDataset(f"line {line}: {message}", code=code, line=line)


def _chunks(source: IO[bytes] | Iterable[bytes] | bytes) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray):
        for start in range(0, len(source), _CHUNK):
            yield bytes(source[start:start + _CHUNK])
        return
    read = getattr(source, "read", None)
    if callable(read):
        while block := read(_CHUNK):
            yield block
        return
    for block in source:  # an iterator of byte chunks (e.g. an upload stream)
        if not isinstance(block, bytes | bytearray):
            raise TypeError(f"dataset stream yielded {type(block).__name__}, expected bytes")
        yield bytes(block)


def _lines(source: IO[bytes] | Iterable[bytes] | bytes, *, max_bytes: int,
           max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) pairs; enforces the total and per-line byte limits while reading."""
    total = 0
    number = 1
    pending = bytearray()
    for block in _chunks(source):
        total += len(block)
        if total > max_bytes:
            raise PayloadTooLarge(f"dataset exceeds the limit of {max_bytes} bytes",
                                  limit=max_bytes)
        pending += block
        start = 0
        while (cut := pending.find(b"\n", start)) >= 0:
            if cut - start > max_line_bytes:
                raise _invalid("line_too_long", number,
                               f"longer than the limit of {max_line_bytes} bytes")
            yield number, bytes(pending[start:cut])
            start = cut + 1
            number += 1
        del pending[:start]
        if len(pending) > max_line_bytes:
            raise _invalid("line_too_long", number,
                           f"longer than the limit of {max_line_bytes} bytes")
    if pending:
        yield number, bytes(pending)


def _perturbed(number: int, value: Any) -> tuple[str, ...]:
    """The wrong answers of a prompt/completion record, or why they are refused."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PERTURBED:
        raise _invalid("invalid_record", number,
                       f'"perturbed" must be a list of 1 to {MAX_PERTURBED} strings')
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise _invalid("invalid_record", number,
                           '"perturbed" answers must be non-empty strings')
    return tuple(value)


def _record(number: int, raw: bytes) -> Example | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _invalid("invalid_utf8", number, f"not valid UTF-8 (byte {e.start})") from e
    if number == 1:
        text = text.removeprefix(codecs.BOM_UTF8.decode("utf-8"))
    if not text.strip():
        return None  # blank lines (a trailing newline, CRLF files) carry nothing
    try:
        obj: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise _invalid("invalid_json", number, f"not valid JSON ({e.msg}, column {e.colno})") from e
    if not isinstance(obj, dict):
        raise _invalid("invalid_record", number,
                       f"expected a JSON object, got {type(obj).__name__}")
    has_text = "text" in obj
    has_pair = "prompt" in obj or "completion" in obj
    if has_text == has_pair:
        raise _invalid("invalid_record", number,
                       'expected either {"text": ...} or {"prompt": ..., "completion": ...}')
    fields = ("text",) if has_text else ("prompt", "completion")
    for key in fields:
        if not isinstance(obj.get(key), str):
            raise _invalid("invalid_record", number, f'"{key}" must be a string')
    if has_text:
        if not obj["text"].strip():
            raise _invalid("invalid_record", number, '"text" is empty')
        if "perturbed" in obj:
            raise _invalid("invalid_record", number,
                           '"perturbed" needs a prompt/completion record, not "text"')
        return Example("", obj["text"])
    if not obj["completion"].strip():
        raise _invalid("invalid_record", number, '"completion" is empty')
    perturbed = _perturbed(number, obj["perturbed"]) if "perturbed" in obj else ()
    return Example(obj["prompt"], obj["completion"], perturbed)


def parse_jsonl(source: IO[bytes] | Iterable[bytes] | bytes, *, name: str = "",
                max_bytes: int = DEFAULT_MAX_BYTES,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> TextDataset:
    """Parse a JSONL stream without holding more than one line of raw bytes at a time.

    Raises PayloadTooLarge past `max_bytes` and InvalidDataset (with the line number) on the
    first bad line; a stream with no records is ``empty_dataset``.
    """
    examples: list[Example] = []
    for number, raw in _lines(source, max_bytes=max_bytes, max_line_bytes=max_line_bytes):
        example = _record(number, raw.removesuffix(b"\r"))
        if example is not None:
            examples.append(example)
    if not examples:
        raise InvalidDataset(f"dataset {name or '(unnamed)'} holds no records",
                             code="empty_dataset")
    return TextDataset(examples, name=name)


# --- tokenisation -------------------------------------------------------------------------


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer we use."""

    pad_token_id: int | None
    eos_token_id: int | None

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example and how many leading ones belong to the prompt."""

    index: int
    input_ids: list[int]
    prompt_len: int


@dataclass
class Batch:
    """Right-padded tensors; labels are IGNORE_INDEX on prompt and padding tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor  # positions of the examples in their dataset (for cached references)

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device), self.index.to(device))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _ids(tokenizer: Tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode(tokenizer: Tokenizer, dataset: TextDataset, *, max_length: int = 512) -> list[Encoded]:
    """Tokenise prompt (with special tokens) and completion (without) separately.

    Encoding the halves apart keeps the prompt/target boundary exact whatever the tokenizer
    merges across it. Over-long examples lose the start of the prompt first, then the end
    of the completion, so that targets survive truncation.
    """
    encoded: list[Encoded] = []
    for i, example in enumerate(dataset.examples):
        if example.prompt:
            prompt = _ids(tokenizer, example.prompt, special=True)
            completion = _ids(tokenizer, example.completion, special=False)
        else:
            prompt, completion = [], _ids(tokenizer, example.completion, special=True)
        if not completion or (not prompt and len(completion) < 2):
            raise InvalidDataset(f"{dataset.name or 'dataset'} record {i + 1}: no token "
                                 "left to predict after tokenisation", code="invalid_record")
        completion = completion[:max_length]
        keep = max_length - len(completion)
        prompt = prompt[len(prompt) - keep:] if keep > 0 else []
        encoded.append(Encoded(i, prompt + completion, len(prompt)))
    return encoded


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The padding id; padded positions are masked, so any valid id will do."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(items: Sequence[Encoded], *, pad_id: int) -> Batch:
    """Right-pad a list of encoded examples into one batch."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        ids = torch.tensor(item.input_ids, dtype=torch.long)
        input_ids[row, :len(ids)] = ids
        attention[row, :len(ids)] = 1
        labels[row, item.prompt_len:len(ids)] = ids[item.prompt_len:]
        if item.prompt_len == 0:
            labels[row, 0] = IGNORE_INDEX  # nothing precedes the first token to predict it
    index = torch.tensor([item.index for item in items], dtype=torch.long)
    return Batch(input_ids, attention, labels, index)


def make_batches(items: Sequence[Encoded], *, batch_size: int, pad_id: int,
                 generator: torch.Generator | None = None) -> list[Batch]:
    """Batches in order, or shuffled with `generator` (reproducible from its seed)."""
    order = list(range(len(items)))
    if generator is not None:
        order = torch.randperm(len(items), generator=generator).tolist()
    return [collate([items[i] for i in order[start:start + batch_size]], pad_id=pad_id)
            for start in range(0, len(order), batch_size)]
