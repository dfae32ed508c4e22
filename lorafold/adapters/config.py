"""PEFT `adapter_config.json`: the fields that change the math, checked up front.

A LoRA module's delta is ``scale * B @ A`` with ``scale = alpha / r`` (or ``alpha / sqrt(r)``
with rsLoRA), where ``r`` and ``alpha`` may be overridden per module by ``rank_pattern`` /
``alpha_pattern``. Patterns are matched the way PEFT matches them
(``peft.utils.other.get_pattern_key``): a pattern applies to a module whose dotted name
ends with it, and the first matching pattern wins.

The config comes from an upload, so every field read here is type-checked (a wrong type is
refused with code ``invalid_config``, naming the field and what was expected), and the
patterns run on RE2, whose matching time is linear in the name: a pattern such as
``(a+)+$`` cannot stall the validator. PEFT runs them on Python's ``re``; a pattern that
the two engines would read differently, or that RE2 cannot run (backreferences,
lookarounds, atomic groups), is refused with code ``unsupported_pattern``. Left over:
``\\d``, ``\\w``, ``\\s`` and ``\\b`` are ASCII-only in RE2 (Unicode in ``re``), and RE2's
``$`` does not match before a trailing newline; neither occurs in a PyTorch module name
that PEFT itself would target.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import re2

from lorafold.errors import InvalidAdapter

PEFT_PREFIX = "base_model.model."

# Limits per rank_pattern / alpha_pattern: matching costs one RE2 scan of the module name
# per (pattern, module), and a compiled pattern may hold up to RE2_MAX_MEM bytes. A
# pattern per LoRA module of a 126-layer model (7 per layer) is under 900 entries.
MAX_PATTERNS = 1024
MAX_PATTERN_LENGTH = 512
RE2_MAX_MEM = 1 << 20

_T = TypeVar("_T")


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False  # refusals are reported as InvalidAdapter, not on stderr
    options.max_mem = RE2_MAX_MEM
    return options


_RE2_OPTIONS = _re2_options()
# What both `re` and RE2 accept but read differently: `{,n}` (re: {0,n}; RE2: literal) and,
# inside a class, a nested `[` (RE2: POSIX classes such as [[:alpha:]]; re: literal, with a
# FutureWarning) or a doubled set operator (re announces set operations).
_OPEN_MIN_REPEAT = re.compile(r"\{,\d*\}")


@dataclass(frozen=True)
class ModulePattern:
    """One `rank_pattern` / `alpha_pattern` key, compiled as PEFT applies it."""

    pattern: str
    regex: Any = field(repr=False, compare=False)  # re2._Regexp (google-re2 has no hints)

    def matches(self, name: str) -> bool:
        """Whether PEFT would apply the pattern to the module `name` (its model path)."""
        return self.regex.match(name) is not None


def peft_regex(pattern: str) -> str:
    """The regex PEFT builds from a pattern key (`get_pattern_key`)."""
    return rf"(.*\.)?({pattern})$"


def compile_pattern(pattern: str, *, where: str = "rank_pattern") -> ModulePattern:
    """Compile a pattern key for RE2, refusing what PEFT's `re` would read differently."""
    label = f"adapter_config.json: {where} key {reprlib.repr(pattern)}"
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise _refuse("pattern_too_long", f"{label} is {len(pattern)} characters long; the "
                                          f"limit is {MAX_PATTERN_LENGTH}", field=where)
    ambiguous = _ambiguous_construct(pattern)
    if ambiguous is not None:
        raise _refuse("unsupported_pattern", f"{label} uses {ambiguous}; escape it or write "
                                             "it another way", field=where)
    try:  # as PEFT would: alone, and inside its wrapper
        re.compile(pattern)
        re.compile(peft_regex(pattern))
    except (re.error, RecursionError, OverflowError) as e:
        raise _refuse("invalid_config", f"{label} is not a regex: {e}", field=where) from e
    try:
        regex = re2.compile(peft_regex(pattern), _RE2_OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(
            e.args[0], bytes) else str(e)
        raise _refuse("unsupported_pattern",
                      f"{label} cannot be matched in linear time ({reason}); backreferences, "
                      "lookarounds, atomic groups, possessive quantifiers, conditionals and "
                      "repetitions beyond 1000 are not supported", field=where) from e
    return ModulePattern(pattern, regex)


def _ambiguous_construct(pattern: str) -> str | None:
    """The first construct that `re` and RE2 both accept but read differently, if any."""
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            if char == "]":
                in_class = False
            elif char == "[":
                return "a '[' inside a character class (RE2 reads [:alpha:] as a POSIX class)"
            elif char in "-&~|" and pattern[i + 1:i + 2] == char:
                return f"{char * 2!r} inside a character class (a future set operation)"
        elif char == "[":
            in_class = True
            i += 1
            if pattern[i:i + 1] == "^":
                i += 1
            if pattern[i:i + 1] == "]":  # a leading ']' is a literal in both
                i += 1
            continue
        elif char == "{" and _OPEN_MIN_REPEAT.match(pattern, i):
            return "'{,n}' (a repetition in re, literal text in RE2)"
        i += 1
    return None


def _compile_patterns(patterns: Mapping[str, _T], where: str) -> tuple[tuple[ModulePattern, _T],
                                                                        ...]:
    return tuple((compile_pattern(p, where=where), value) for p, value in patterns.items())


@dataclass(frozen=True)
class LoraSettings:
    """The parsed, validated parts of a PEFT LoRA config that lorafold relies on."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)
    _rank_rules: tuple[tuple[ModulePattern, int], ...] = field(
        init=False, repr=False, compare=False)
    _alpha_rules: tuple[tuple[ModulePattern, float], ...] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rank_rules",
                           _compile_patterns(self.rank_pattern, "rank_pattern"))
        object.__setattr__(self, "_alpha_rules",
                           _compile_patterns(self.alpha_pattern, "alpha_pattern"))

    def rank_for(self, module: str) -> int:
        return int(_pattern_value(self._rank_rules, module, self.r))

    def alpha_for(self, module: str) -> float:
        return float(_pattern_value(self._alpha_rules, module, self.lora_alpha))

    def scale_for(self, module: str) -> float:
        """The factor PEFT multiplies ``B @ A`` by for this module."""
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def model_path(module_key: str) -> str:
    """`base_model.model.model.layers.0.q_proj` -> `model.layers.0.q_proj` (PEFT's view)."""
    return module_key[len(PEFT_PREFIX):] if module_key.startswith(PEFT_PREFIX) else module_key


def _pattern_value(rules: Sequence[tuple[ModulePattern, _T]], module: str, default: _T) -> _T:
    name = model_path(module)
    for pattern, value in rules:
        if pattern.matches(name):
            return value
    return default


def _refuse(code: str, message: str, **details: Any) -> InvalidAdapter:
    return InvalidAdapter(message, code=code, **details)


# -- type checks: each reads one field, null meaning the default ------------------------

def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _wrong_type(name: str, expected: str, value: Any) -> InvalidAdapter:
    return _refuse("invalid_config", f"adapter_config.json: {name} must be {expected}, not "
                                     f"{_json_type(value)} ({reprlib.repr(value)})", field=name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _bool(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _wrong_type(name, "true or false", value)
    return value


def _optional_str(raw: Mapping[str, Any], name: str) -> str | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, str):
        raise _wrong_type(name, "a string or null", value)
    return value


def _rank(value: Any, name: str) -> int:
    if not _is_int(value) or value <= 0:
        raise _wrong_type(name, "a positive integer", value)
    return int(value)


def _alpha(value: Any, name: str) -> float:
    if _is_number(value):
        try:
            alpha = float(value)
        except OverflowError:
            alpha = math.inf
        if math.isfinite(alpha):
            return alpha
    raise _wrong_type(name, "a finite number", value)


def _names(raw: Mapping[str, Any], name: str) -> list[str] | str | None:
    value = raw.get(name)
    if value is None or isinstance(value, str) or _is_strings(value):
        return value
    raise _wrong_type(name, "a list of strings, a string or null", value)


def _string_list(raw: Mapping[str, Any], name: str) -> list[str]:
    value = raw.get(name)
    if value is None:
        return []
    if not _is_strings(value):
        raise _wrong_type(name, "a list of strings or null", value)
    return list(value)


def _patterns(raw: Mapping[str, Any], name: str,
              value_of: Callable[[Any, str], _T]) -> dict[str, _T]:
    patterns = raw.get(name)
    if patterns is None:
        return {}
    if not isinstance(patterns, dict):
        raise _wrong_type(name, "an object mapping module patterns to values", patterns)
    if len(patterns) > MAX_PATTERNS:
        raise _refuse("too_many_patterns", f"adapter_config.json: {name} has {len(patterns)} "
                                           f"patterns; the limit is {MAX_PATTERNS}", field=name)
    return {str(key): value_of(value, f"{name}[{reprlib.repr(key)}]")
            for key, value in patterns.items()}


def _check_layers(raw: Mapping[str, Any]) -> None:
    """Fields copied into merged outputs as they are: their types only."""
    layers = raw.get("layers_to_transform")
    if layers is not None and not (
            (_is_int(layers) and layers >= 0)
            or (isinstance(layers, list) and all(_is_int(v) and v >= 0 for v in layers))):
        raise _wrong_type("layers_to_transform",
                          "a layer index, a list of layer indices or null", layers)
    for name in ("layers_pattern", "exclude_modules"):
        _names(raw, name)


def _refuse_unsupported(raw: Mapping[str, Any]) -> None:
    if _bool(raw, "use_dora"):
        raise _refuse("dora_not_supported",
                      "adapter_config.json: use_dora is true; DoRA adds magnitude vectors, so "
                      "its delta is not a plain low-rank product and cannot be merged as one")
    if _bool(raw, "lora_bias"):
        raise _refuse("lora_bias_not_supported",
                      "adapter_config.json: lora_bias is true; LoRA bias terms are not "
                      "supported (train without lora_bias)")
    bias = _optional_str(raw, "bias")
    if bias not in ("none", None):
        raise _refuse("bias_not_supported",
                      f"adapter_config.json: bias is {bias!r}; trained base-model "
                      "biases are not supported (use bias='none')")
    modules_to_save = _string_list(raw, "modules_to_save")
    if modules_to_save:
        raise _refuse("modules_to_save_not_supported",
                      f"adapter_config.json: modules_to_save={reprlib.repr(modules_to_save)}; "
                      "full-weight modules (e.g. task heads) are not LoRA deltas and are "
                      "refused rather than averaged")
    for name in ("layer_replication", "target_parameters"):
        value = raw.get(name)
        if value is not None and not isinstance(value, list):
            raise _wrong_type(name, "a list or null", value)
        if value:
            raise _refuse("unsupported_config",
                          f"adapter_config.json: {name} is not supported", field=name)


def parse_config(raw: Mapping[str, Any]) -> LoraSettings:
    """Validate a PEFT config dict; refuse what lorafold cannot merge exactly."""
    peft_type = raw.get("peft_type")
    if peft_type is None:
        peft_type = "LORA"
    if not isinstance(peft_type, str):
        raise _wrong_type("peft_type", "a string", peft_type)
    if peft_type.upper() != "LORA":
        raise _refuse("unsupported_peft_type",
                      f"adapter_config.json: peft_type is {reprlib.repr(peft_type)}; only "
                      "LORA adapters are supported")
    _refuse_unsupported(raw)
    r = _rank(raw.get("r"), "r")
    alpha = float(r) if raw.get("lora_alpha") is None else _alpha(raw["lora_alpha"],
                                                                  "lora_alpha")
    _check_layers(raw)
    target = _names(raw, "target_modules")
    return LoraSettings(
        r=r, lora_alpha=alpha, use_rslora=_bool(raw, "use_rslora"),
        rank_pattern=_patterns(raw, "rank_pattern", _rank),
        alpha_pattern=_patterns(raw, "alpha_pattern", _alpha),
        fan_in_fan_out=_bool(raw, "fan_in_fan_out"),
        target_modules=sorted(target) if isinstance(target, list) else target,
        base_model_name_or_path=_optional_str(raw, "base_model_name_or_path"),
        task_type=_optional_str(raw, "task_type"), raw=dict(raw),
    )


def _as_regex(target: Sequence[str] | str) -> str:
    """A PEFT list of names matches a module equal to a name or ending in '.name'."""
    if isinstance(target, str):
        return target
    names = "|".join(re.escape(t) for t in target)
    return rf"(?:.*\.)?(?:{names})"


def union_target_modules(targets: Sequence[list[str] | str | None]) -> list[str] | str | None:
    """Union of the inputs' target_modules, as a list when all are lists, else one regex."""
    present = [t for t in targets if t is not None]
    if not present:
        return None
    if all(isinstance(t, list) for t in present):
        return sorted({name for t in present for name in t})
    unique = list(dict.fromkeys(_as_regex(t) for t in present))
    return unique[0] if len(unique) == 1 else "|".join(f"(?:{p})" for p in unique)
