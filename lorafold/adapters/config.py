"""PEFT `adapter_config.json`: the fields that change the math, checked up front.

A LoRA module's delta is ``scale * B @ A`` with ``scale = alpha / r`` (or ``alpha / sqrt(r)``
with rsLoRA), where ``r`` and ``alpha`` may be overridden per module by ``rank_pattern`` /
``alpha_pattern``. Patterns are matched the way PEFT matches them
(``peft.utils.other.get_pattern_key``): a pattern applies to a module whose dotted name
ends with it, and the first matching pattern wins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorafold.errors import InvalidAdapter

PEFT_PREFIX = "base_model.model."


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

    def rank_for(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def alpha_for(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale_for(self, module: str) -> float:
        """The factor PEFT multiplies ``B @ A`` by for this module."""
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def model_path(module_key: str) -> str:
    """`base_model.model.model.layers.0.q_proj` -> `model.layers.0.q_proj` (PEFT's view)."""
    return module_key[len(PEFT_PREFIX):] if module_key.startswith(PEFT_PREFIX) else module_key


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    name = model_path(module)
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _refuse(code: str, message: str) -> InvalidAdapter:
    return InvalidAdapter(message, code=code)


def parse_config(raw: Mapping[str, Any]) -> LoraSettings:
    """Validate a PEFT config dict; refuse what lorafold cannot merge exactly."""
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _refuse("unsupported_peft_type",
                      f"adapter_config.json: peft_type is {peft_type!r}; only LORA adapters "
                      "are supported")
    if raw.get("use_dora"):
        raise _refuse("dora_not_supported",
                      "adapter_config.json: use_dora is true; DoRA adds magnitude vectors, so "
                      "its delta is not a plain low-rank product and cannot be merged as one")
    if raw.get("lora_bias"):
        raise _refuse("lora_bias_not_supported",
                      "adapter_config.json: lora_bias is true; LoRA bias terms are not "
                      "supported (train without lora_bias)")
    if raw.get("bias", "none") not in ("none", None):
        raise _refuse("bias_not_supported",
                      f"adapter_config.json: bias is {raw.get('bias')!r}; trained base-model "
                      "biases are not supported (use bias='none')")
    if raw.get("modules_to_save"):
        raise _refuse("modules_to_save_not_supported",
                      f"adapter_config.json: modules_to_save={raw.get('modules_to_save')!r}; "
                      "full-weight modules (e.g. task heads) are not LoRA deltas and are "
                      "refused rather than averaged")
    if raw.get("layer_replication") or raw.get("target_parameters"):
        raise _refuse("unsupported_config",
                      "adapter_config.json: layer_replication / target_parameters are not "
                      "supported")
    try:
        r = int(raw["r"])
        alpha = float(raw.get("lora_alpha", r))
        rank_pattern = {str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()}
        alpha_pattern = {str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()}
    except (KeyError, TypeError, ValueError) as e:
        raise _refuse("invalid_config",
                      f"adapter_config.json: r / lora_alpha / patterns are missing or not "
                      f"numbers ({e})") from e
    if r <= 0 or any(v <= 0 for v in rank_pattern.values()):
        raise _refuse("invalid_config", "adapter_config.json: ranks must be positive")
    for pattern in (*rank_pattern, *alpha_pattern):
        try:
            re.compile(pattern)
        except re.error as e:
            raise _refuse("invalid_config",
                          f"adapter_config.json: pattern {pattern!r} is not a regex: {e}") from e
    target = raw.get("target_modules")
    if target is not None and not isinstance(target, str):
        target = sorted(str(t) for t in target)
    return LoraSettings(
        r=r, lora_alpha=alpha, use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        target_modules=target, base_model_name_or_path=raw.get("base_model_name_or_path"),
        task_type=raw.get("task_type"), raw=dict(raw),
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
