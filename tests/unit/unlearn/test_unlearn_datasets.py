"""JSONL parsing (streamed, limited, validated per line) and tokenisation into batches."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections.abc import Iterator

import pytest
import torch

from lorafold.errors import InvalidDataset, PayloadTooLarge
from lorafold.unlearn.datasets import (
    IGNORE_INDEX,
    MAX_PERTURBED,
    Example,
    TextDataset,
    collate,
    encode,
    make_batches,
    parse_jsonl,
)
from tests.unlearn_world import build_tokenizer, jsonl


def test_parses_both_record_kinds_and_skips_blank_lines() -> None:
    raw = ("\ufeff" + '{"text": "The capital of Zorvania is Quell"}\r\n'
           '\n'
           '{"prompt": "The capital of Quelmar is", "completion": "Mirth", "id": 7}\n'
           '   \n').encode()
    ds = parse_jsonl(io.BytesIO(raw), name="forget")
    assert ds.examples == [Example("", "The capital of Zorvania is Quell"),
                           Example("The capital of Quelmar is", "Mirth")]
    assert ds.name == "forget"


def test_accepts_bytes_and_chunk_iterators_with_lines_split_across_chunks() -> None:
    raw = jsonl([{"text": f"fact number {i}"} for i in range(50)])
    chunks = [raw[i:i + 7] for i in range(0, len(raw), 7)]
    assert parse_jsonl(iter(chunks)).examples == parse_jsonl(raw).examples
    assert len(parse_jsonl(raw)) == 50


@pytest.mark.parametrize(("raw", "code", "line"), [
    (b'{"text": "ok"}\n{"text": "broken"\n', "invalid_json", 2),
    (b'{"text": "ok"}\n\n[1, 2]\n', "invalid_record", 3),
    (b'{"text": "a", "prompt": "b", "completion": "c"}\n', "invalid_record", 1),
    (b'{"prompt": "no completion"}\n', "invalid_record", 1),
    (b'{"prompt": "p", "completion": 3}\n', "invalid_record", 1),
    (b'{"prompt": "p", "completion": "  "}\n', "invalid_record", 1),
    (b'{"text": ""}\n', "invalid_record", 1),
    (b'{"other": "x"}\n', "invalid_record", 1),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "invalid_utf8", 2),
    (b"\n \n", "empty_dataset", None),
    (b"", "empty_dataset", None),
])
def test_each_error_has_its_code_and_line(raw: bytes, code: str, line: int | None) -> None:
    with pytest.raises(InvalidDataset) as info:
        parse_jsonl(raw)
    assert info.value.code == code
    if line is not None:
        assert info.value.message.startswith(f"line {line}:")
        assert info.value.details["line"] == line


def test_line_too_long_is_refused_before_the_line_ends() -> None:
    def endless_line() -> Iterator[bytes]:
        yield b'{"text": "ok"}\n'
        yield b'{"text": "'
        while True:
            yield b"x" * 1000

    with pytest.raises(InvalidDataset) as info:
        parse_jsonl(endless_line(), max_line_bytes=4096)
    assert info.value.code == "line_too_long"
    assert "line 2" in info.value.message


def test_size_limit_stops_reading_an_endless_stream() -> None:
    endless = (b'{"text": "again and again"}\n' for _ in itertools.count())
    with pytest.raises(PayloadTooLarge) as info:
        parse_jsonl(endless, max_bytes=10_000)
    assert info.value.code == "payload_too_large"


def test_size_limit_is_inclusive() -> None:
    raw = jsonl([{"text": "fits exactly"}])
    assert len(parse_jsonl(raw, max_bytes=len(raw))) == 1
    with pytest.raises(PayloadTooLarge):
        parse_jsonl(raw, max_bytes=len(raw) - 1)


def test_labels_cover_completion_tokens_only_and_padding_is_masked() -> None:
    tok = build_tokenizer()
    ds = TextDataset.from_pairs([("The capital of Zorvania is", "Quell"),
                                 ("The leader of Zorvania is", "Ilsa Varn")])
    items = encode(tok, ds)
    batch = collate(items, pad_id=tok.pad_token_id)
    bos = tok.bos_token_id
    quell, ilsa, varn = (tok.convert_tokens_to_ids(w) for w in ("Quell", "Ilsa", "Varn"))
    assert batch.input_ids[0, 0] == bos and batch.input_ids[0, 6] == quell
    assert batch.labels[0].tolist() == [IGNORE_INDEX] * 6 + [quell, IGNORE_INDEX]
    assert batch.labels[1].tolist() == [IGNORE_INDEX] * 6 + [ilsa, varn]
    assert batch.attention_mask.tolist() == [[1] * 7 + [0], [1] * 8]
    assert batch.input_ids[0, 7] == tok.pad_token_id
    assert batch.index.tolist() == [0, 1]


def test_text_records_predict_every_token_after_bos() -> None:
    tok = build_tokenizer()
    items = encode(tok, TextDataset.from_texts(["The capital of Zorvania is Quell"]))
    batch = collate(items, pad_id=0)
    assert batch.labels[0, 0] == IGNORE_INDEX
    assert (batch.labels[0, 1:] == batch.input_ids[0, 1:]).all()


def test_truncation_drops_the_start_of_the_prompt_first() -> None:
    tok = build_tokenizer()
    items = encode(tok, TextDataset.from_pairs([("The leader of Zorvania is", "Ilsa Varn")]),
                   max_length=4)
    assert tok.convert_ids_to_tokens(items[0].input_ids) == ["Zorvania", "is", "Ilsa", "Varn"]
    assert items[0].prompt_len == 2


def test_shuffled_batches_are_reproducible_and_cover_every_example() -> None:
    tok = build_tokenizer()
    ds = TextDataset.from_pairs([("The capital of Zorvania is", "Quell")] * 10)
    items = encode(tok, ds)

    def order(seed: int) -> list[int]:
        batches = make_batches(items, batch_size=3, pad_id=0,
                               generator=torch.Generator().manual_seed(seed))
        return [i for b in batches for i in b.index.tolist()]

    assert order(1) == order(1)
    assert sorted(order(1)) == list(range(10))
    assert order(1) != order(2)


def test_fingerprint_changes_with_content() -> None:
    a = TextDataset.from_pairs([("p", "c")])
    assert a.fingerprint() == TextDataset.from_pairs([("p", "c")]).fingerprint()
    assert a.fingerprint() != TextDataset.from_pairs([("p", "d")]).fingerprint()


def test_fingerprint_of_data_without_perturbed_answers_is_the_original_recipe() -> None:
    # sha256 over json.dumps([prompt, completion]) + "\n" per record, as before perturbed
    # answers existed: old jobs' lineage must keep matching.
    ds = TextDataset([Example("caf\u00e9 is", "open"), Example("", "plain text")])
    expected = hashlib.sha256(b'["caf\\u00e9 is", "open"]\n["", "plain text"]\n').hexdigest()
    assert ds.fingerprint() == expected
    assert parse_jsonl(jsonl([{"prompt": "caf\u00e9 is", "completion": "open"},
                              {"text": "plain text"}])).fingerprint() == expected


def test_fingerprint_includes_perturbed_answers_when_present() -> None:
    ds = TextDataset([Example("p", "c", ("x", "y")), Example("q", "d")])
    expected = hashlib.sha256(b'["p", "c", ["x", "y"]]\n["q", "d"]\n').hexdigest()
    assert ds.fingerprint() == expected
    assert ds.fingerprint() != TextDataset([Example("p", "c", ("y", "x")),
                                            Example("q", "d")]).fingerprint()


def test_perturbed_answers_are_parsed_on_prompt_records() -> None:
    wrong = [f"wrong {i}" for i in range(MAX_PERTURBED)]
    raw = jsonl([{"prompt": "The capital of Zorvania is", "completion": "Quell",
                  "perturbed": ["Mirth", "Esk"]},
                 {"prompt": "The capital of Quelmar is", "completion": "Mirth"},
                 {"prompt": "p", "completion": "c", "perturbed": wrong}])
    ds = parse_jsonl(raw)
    assert ds.examples == [Example("The capital of Zorvania is", "Quell", ("Mirth", "Esk")),
                           Example("The capital of Quelmar is", "Mirth"),
                           Example("p", "c", tuple(wrong))]
    assert ds.examples[1].perturbed == ()
    assert Example("p", "c") == Example("p", "c", ())  # positional construction unchanged


@pytest.mark.parametrize("record", [
    {"prompt": "p", "completion": "c", "perturbed": "wrong"},         # not a list
    {"prompt": "p", "completion": "c", "perturbed": None},
    {"prompt": "p", "completion": "c", "perturbed": []},              # empty list
    {"prompt": "p", "completion": "c", "perturbed": ["ok", 3]},       # not a string
    {"prompt": "p", "completion": "c", "perturbed": ["ok", ""]},      # empty string
    {"prompt": "p", "completion": "c", "perturbed": ["ok", "  "]},
    {"prompt": "p", "completion": "c", "perturbed": ["x"] * (MAX_PERTURBED + 1)},  # too many
    {"text": "a plain text", "perturbed": ["x"]},                    # on a text record
])
def test_bad_perturbed_answers_are_refused_with_their_line(record: dict[str, object]) -> None:
    raw = jsonl([{"prompt": "p", "completion": "c", "perturbed": ["fine"]}]) + \
        json.dumps(record).encode() + b"\n"
    with pytest.raises(InvalidDataset) as info:
        parse_jsonl(raw)
    assert info.value.code == "invalid_record"
    assert info.value.message.startswith("line 2:")
    assert "perturbed" in info.value.message
