"""rank_pattern / alpha_pattern keys: PEFT's matching on ordinary patterns, in linear time
(RE2), with what RE2 cannot run, or would read differently, refused at parse time."""

from __future__ import annotations

import re
import time

import pytest

from lorafold.adapters import LoraSettings, parse_config
from lorafold.adapters.config import MAX_PATTERN_LENGTH, MAX_PATTERNS
from lorafold.errors import InvalidAdapter

PATTERNS = [
    "q_proj", "v_proj", "proj", "_proj", "layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.q_proj", r"model\.layers\.1\..*", r"layers\.\d+\.mlp\..*",
    "q_proj|v_proj", "(q|k)_proj", "(?:up|down)_proj", ".*", ".*_proj", "[qk]_proj",
    "[^q]_proj", "[a-z]+_proj", r"\w+\.down_proj", r"^model\.layers\.1\..*", "^q_proj",
    "q_proj$", "mlp", "mlp.*", "layers.1.*", "(?i:Q_PROJ)", "q_proj?", "(q)_proj",
    "(?P<kind>q|v)_proj", "h.[01].attn.c_attn", r"h\.1\.attn", "c_.*", "emb", "conv|lin",
    "", "a{2,3}", "a{", "x{1", "[]q]_proj", "[.]q_proj", r"\.q_proj", r"layers\.1[0-9]\..*",
    "(down|up)_pro", "lm_head", "model.embed_tokens", "(.*)", r"\A.*q_proj", r"q_pro\w",
    "self_attn.(q|k|v|o)_proj", "[0-9]+.mlp.up_proj", "up_proj|",
]
NAMES = [
    "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.up_proj",
    "model.layers.10.mlp.down_proj", "model.layers.0.self_attn.Q_PROJ", "q_proj", "xq_proj",
    "model.embed_tokens", "lm_head", "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj",
    "emb", "conv", "lin", "aa", "a{", "x{1", "]_proj", "q_proj.q_proj", "", ".q_proj",
    "model.layers.0.self_attn.q_proj.base_layer",
]


def peft_matches(pattern: str, name: str) -> bool:
    """PEFT's own test (peft.utils.other.get_pattern_key), on Python's re."""
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


@pytest.mark.parametrize("pattern", PATTERNS)
def test_ordinary_patterns_match_as_peft_matches_them(pattern: str) -> None:
    settings = LoraSettings(r=8, lora_alpha=8, rank_pattern={pattern: 2})
    for name in NAMES:
        expected = 2 if peft_matches(pattern, name) else 8
        assert settings.rank_for(name) == expected, (pattern, name)
        assert settings.rank_for("base_model.model." + name) == expected, (pattern, name)


def test_the_first_matching_pattern_wins_as_in_peft() -> None:
    from peft.utils.other import get_pattern_key

    ordered = {"layers.0.self_attn.q_proj": 1, "q_proj": 2, r"layers\.\d+\..*": 3, ".*": 4}
    settings = parse_config({"r": 8, "rank_pattern": ordered,
                             "alpha_pattern": {k: float(v) for k, v in ordered.items()}})
    for name in NAMES:
        key = get_pattern_key(list(ordered), name)
        assert settings.rank_for(name) == ordered.get(key, 8), name
        assert settings.alpha_for(name) == float(ordered.get(key, 8)), name


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(a|aa)+$", r"(a*)*$", r"(.*a){12}",
                                     r"(\w+)*b", r"(a+a+)+b"])
def test_pathological_patterns_return(pattern: str) -> None:
    """On Python's re `(a+)+$` takes seconds at 24 characters and 4x more per two; here a
    40-character name is a plain linear scan (the bound is a sanity check, not a benchmark)."""
    settings = parse_config({"r": 8, "rank_pattern": {pattern: 2}})
    started = time.perf_counter()
    for name in ("a" * 40 + "!", "model.layers.0." + "a" * 40 + "_proj", "a" * 5000 + "!"):
        assert settings.rank_for(name) in (2, 8)
    assert time.perf_counter() - started < 5


def test_a_pathological_pattern_still_matches_what_it_should() -> None:
    settings = parse_config({"r": 8, "rank_pattern": {"(a+)+": 2}})
    assert settings.rank_for("model." + "a" * 40) == 2
    assert settings.rank_for("model." + "a" * 40 + "b") == 8


REFUSED = {
    r"(q)\1_proj": "unsupported_pattern",                 # backreference
    r"(?P<x>q)(?P=x)": "unsupported_pattern",             # named backreference
    r"q(?=_proj)_proj": "unsupported_pattern",            # lookahead
    r"(?!v)\w_proj": "unsupported_pattern",               # negative lookahead
    r"(?<=\.)q_proj": "unsupported_pattern",              # lookbehind
    r"(?<!k)q_proj": "unsupported_pattern",               # negative lookbehind
    r"(?>a+)": "unsupported_pattern",                     # atomic group
    r"a++": "unsupported_pattern",                        # possessive
    r"(q)?(?(1)_proj|x)": "unsupported_pattern",          # conditional
    r"q_proj\Z": "unsupported_pattern",                   # re-only anchor
    r"a{1001}": "unsupported_pattern",                    # beyond RE2's repetition limit
    r"(?#comment)q_proj": "unsupported_pattern",          # comment group
    r"[[:alpha:]]_proj": "unsupported_pattern",           # POSIX class in RE2, literal in re
    r"[[q]_proj": "unsupported_pattern",                  # nested set
    r"[a&&b]_proj": "unsupported_pattern",                # future set operation in re
    r"q{,3}_proj": "unsupported_pattern",                 # {0,3} in re, literal in RE2
    "(": "invalid_config",                                # not a regex
    "q_proj)|(v": "invalid_config",                       # would break out of PEFT's group
    "(?i)q_proj": "invalid_config",                       # PEFT's re refuses it (3.11)
    "a" * (MAX_PATTERN_LENGTH + 1): "pattern_too_long",
}


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("pattern", sorted(REFUSED))
def test_what_the_linear_engine_cannot_run_is_refused(pattern: str, field: str) -> None:
    with pytest.raises(InvalidAdapter) as err:
        parse_config({"r": 8, field: {pattern: 2}})
    assert err.value.code == REFUSED[pattern]
    assert f"adapter_config.json: {field} key" in err.value.message


def test_too_many_patterns_are_refused() -> None:
    patterns = {f"model.layers.{i}.q_proj": 2 for i in range(MAX_PATTERNS + 1)}
    with pytest.raises(InvalidAdapter) as err:
        parse_config({"r": 8, "rank_pattern": patterns})
    assert err.value.code == "too_many_patterns"
    at_the_limit = dict(list(patterns.items())[:MAX_PATTERNS])
    assert parse_config({"r": 8, "rank_pattern": at_the_limit}).rank_for(
        "model.layers.3.q_proj") == 2


def test_escaped_brackets_and_braces_are_fine() -> None:
    settings = parse_config({"r": 8, "rank_pattern": {r"q\[0\]": 2, r"k\{,3\}": 3}})
    assert settings.rank_for("model.q[0]") == 2
    assert settings.rank_for("model.k{,3}") == 3
