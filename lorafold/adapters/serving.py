"""Will this adapter load in a serving engine? A verdict per rule, from the header alone.

lorafold's own checks (lorafold.adapters.reader) already guarantee what PEFT needs; the
engines are stricter, each in its own way. The rules below are facts from the engines'
sources and docs (see docs/serving.md for the references):

- vLLM: the rank must not exceed the server's `--max-lora-rank`, one of
  VLLM_MAX_LORA_RANKS (default 16); per-module `rank_pattern` / `alpha_pattern` are
  ignored, so such an adapter would be served with the wrong rank or scale; DoRA and
  `modules_to_save` are refused (lorafold refuses both on upload already).
- LoRAX / TGI: only keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` are
  mapped (others are dropped with a warning, embedding LoRA included); a module type is
  skipped altogether when any layer lacks it; CUDA graphs are used only for ranks 8–64;
  `base_model_name_or_path` naming another architecture is an error, so it should be the
  hub name of the base model, not a local path.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lorafold.adapters.config import PEFT_PREFIX
from lorafold.adapters.reader import LoraAdapter, ModuleSpec
from lorafold.errors import InvalidRequest
from lorafold.merge.options import SERVING_TARGETS

TARGETS = SERVING_TARGETS
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
LORAX_CUDA_GRAPH_RANKS = (8, 64)
_LAYER = re.compile(r"\.(\d+)\.")

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Check:
    """One rule's verdict: `ok`, or what breaks (`severity`) and how to fix it."""

    rule: str
    ok: bool
    message: str
    severity: Severity = "error"
    fix: str | None = None


@dataclass(frozen=True)
class Preflight:
    target: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """True when the engine will load the adapter (warnings allowed)."""
        return all(c.ok or c.severity == "warning" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks]}


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise InvalidRequest(f"unknown serving target {target!r}; supported: "
                             f"{', '.join(TARGETS)}", code="unknown_target")
    return target


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that fits `rank` (None: none does)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def _max_rank(adapter: LoraAdapter) -> int:
    return max(m.rank for m in adapter.modules.values())


def _vllm_rank(adapter: LoraAdapter) -> Check:
    rank = _max_rank(adapter)
    needed = vllm_max_lora_rank(rank)
    if needed is None:
        return Check("vllm_rank", False, f"rank {rank} exceeds vLLM's largest max_lora_rank "
                     f"({VLLM_MAX_LORA_RANKS[-1]})",
                     fix=f"merge to rank <= {VLLM_MAX_LORA_RANKS[-1]}")
    if needed > VLLM_DEFAULT_MAX_LORA_RANK:
        return Check("vllm_rank", False, f"rank {rank} exceeds vLLM's default max_lora_rank "
                     f"({VLLM_DEFAULT_MAX_LORA_RANK})", severity="warning",
                     fix=f"start vLLM with --max-lora-rank {needed}, or merge to rank <= "
                         f"{VLLM_DEFAULT_MAX_LORA_RANK}")
    return Check("vllm_rank", True, f"rank {rank} fits the default max_lora_rank")


def _vllm_patterns(adapter: LoraAdapter) -> Check:
    config = adapter.config
    patterns = sorted({*config.rank_pattern, *config.alpha_pattern})
    if patterns:
        return Check("vllm_patterns", False,
                     f"vLLM ignores rank_pattern/alpha_pattern ({', '.join(patterns)}): those "
                     "modules would be served with the global r and alpha",
                     fix="re-merge with lorafold (its outputs have one rank and scale)")
    return Check("vllm_patterns", True, "no per-module rank or alpha patterns")


def _vllm_refused_features(adapter: LoraAdapter) -> Check:
    # lorafold refuses both when it opens an adapter; kept as a rule so the verdict lists it.
    raw = adapter.config.raw
    if raw.get("use_dora") or raw.get("modules_to_save"):
        return Check("vllm_features", False, "vLLM refuses DoRA and modules_to_save")
    return Check("vllm_features", True, "no DoRA, no modules_to_save")


def _lorax_keys(adapter: LoraAdapter) -> Check:
    dropped = sorted(m.name for m in adapter.modules.values()
                     if not m.name.startswith(PEFT_PREFIX) or m.kind != "linear")
    if dropped:
        return Check("lorax_keys", False,
                     f"{len(dropped)} module(s) outside base_model.model.<module>.lora_A/B "
                     f".weight would be dropped (e.g. {dropped[0]})",
                     fix="write linear modules only, under the base_model.model. prefix")
    return Check("lorax_keys", True, "every key has the canonical PEFT prefix")


def layer_coverage(modules: Iterable[ModuleSpec]) -> dict[str, list[int]]:
    """Module type → the layers missing it, among the layers that have any targeted module."""
    layers_of: dict[str, set[int]] = defaultdict(set)
    for module in modules:
        match = _LAYER.search(module.name)
        if match is not None:
            layers_of[module.name.rsplit(".", 1)[-1]].add(int(match.group(1)))
    every = set().union(*layers_of.values()) if layers_of else set()
    return {kind: sorted(every - present) for kind, present in sorted(layers_of.items())
            if every - present}


def _lorax_coverage(adapter: LoraAdapter) -> Check:
    missing = layer_coverage(adapter.modules.values())
    if missing:
        kind, layers = next(iter(missing.items()))
        return Check("lorax_coverage", False,
                     f"module type(s) {', '.join(missing)} are missing in some layers (e.g. "
                     f"{kind} in layer {layers[0]}): LoRAX skips such a type in every layer",
                     fix="give every layer the same module types (zero factors where an "
                         "adapter lacked one)")
    return Check("lorax_coverage", True, "every module type is present in every layer")


def _lorax_cuda_graphs(adapter: LoraAdapter) -> Check:
    rank = _max_rank(adapter)
    low, high = LORAX_CUDA_GRAPH_RANKS
    if not low <= rank <= high:
        return Check("lorax_cuda_graphs", False, f"rank {rank} is outside {low}–{high}: "
                     "served without CUDA graphs (slower)", severity="warning",
                     fix=f"merge to a rank in {low}–{high}")
    return Check("lorax_cuda_graphs", True, f"rank {rank} can use CUDA graphs")


def _lorax_base_name(adapter: LoraAdapter) -> Check:
    name = adapter.config.base_model_name_or_path
    if not name or name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return Check("lorax_base_model", False,
                     f"base_model_name_or_path is {name!r}, not a hub name: LoRAX refuses an "
                     "adapter whose base names another architecture", severity="warning",
                     fix="set it to the base model's hub name (--base-model-name ORG/NAME)")
    return Check("lorax_base_model", True, f"base model named {name}")


def _peft(adapter: LoraAdapter) -> Check:
    return Check("peft_loads", True, "a valid PEFT LoRA (checked when opened)")


_RULES = {
    "peft": (_peft,),
    "vllm": (_peft, _vllm_rank, _vllm_patterns, _vllm_refused_features),
    "lorax": (_peft, _lorax_keys, _lorax_coverage, _lorax_cuda_graphs, _lorax_base_name),
}
_RULES["tgi"] = _RULES["lorax"]  # TGI's multi-LoRA loader is LoRAX's


def preflight(adapter: LoraAdapter, target: str) -> Preflight:
    """Every rule of `target` checked against `adapter` (header and config only)."""
    return Preflight(target, tuple(rule(adapter) for rule in _RULES[check_target(target)]))
