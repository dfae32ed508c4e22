"""Make a merge's output load in a serving engine (`target`), without changing its math.

lorafold's outputs already have one rank and one scale (no rank/alpha patterns) and the
canonical PEFT keys. A target adds what its engine needs (rules: lorafold.adapters.serving):
- every target: `target_modules` as an explicit list of module names (never a regex), the
  base model's name as given (`base_model_name`), and a half-precision dtype unless one is
  asked for (engines serve adapters in the model's dtype);
- vllm: the rank must fit vLLM's largest `--max-lora-rank` (refused before merging);
- lorax / tgi: every module type present in every layer that has any: where an input
  lacked one, zero factors fill the gap (a zero delta: the same model), since LoRAX skips a
  module type in all layers when one layer lacks it; embedding LoRA is refused (LoRAX drops
  it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lorafold.adapters.writer import MergedModule
from lorafold.errors import InvalidRequest
from lorafold.merge.options import SERVING_TARGETS

VLLM_MAX_RANK = 512   # vLLM's largest --max-lora-rank (lorafold.adapters.serving)
SERVING_DTYPE = "float16"
_LAYER = re.compile(r"\.(\d+)\.")
_FILLS = ("lorax", "tgi")


def check_target(target: str | None, base_model_name: str | None) -> None:
    """What a request's `target` and `base_model_name` can be refused for up front."""
    if target is not None and target not in SERVING_TARGETS:
        raise InvalidRequest(f"unknown serving target {target!r}; supported: "
                             f"{', '.join(SERVING_TARGETS)}", code="unknown_target")
    if base_model_name is not None and not (0 < len(base_model_name) <= 256):
        raise InvalidRequest("base_model_name must be 1 to 256 characters",
                             code="invalid_parameter")


def check_rank(target: str | None, rank: int) -> None:
    if target == "vllm" and rank > VLLM_MAX_RANK:
        raise InvalidRequest(f"rank {rank} exceeds vLLM's largest max_lora_rank "
                             f"({VLLM_MAX_RANK}); merge to a smaller rank",
                             code="rank_exceeds_target")


def serving_dtype(target: str | None, requested: str | None) -> str | None:
    """The output dtype name: as requested, else half precision for an engine target."""
    if requested is not None or target in (None, "peft"):
        return requested
    return SERVING_DTYPE


def _layer_template(name: str) -> tuple[str, int] | None:
    match = _LAYER.search(name)
    if match is None:
        return None
    return name[:match.start()] + ".{}." + name[match.end():], int(match.group(1))


def fill_module_types(modules: Sequence[MergedModule], target: str | None
                      ) -> list[MergedModule]:
    """For lorax/tgi: zero factors for each (layer, module type) the inputs left out."""
    modules = list(modules)
    if target not in _FILLS:
        return modules
    embedded = [m.spec.name for m in modules if m.spec.kind != "linear"]
    if embedded:
        raise InvalidRequest(f"{target} drops embedding LoRA modules ({embedded[0]}, ...); "
                             "merge adapters without them for this target",
                             code="target_unsupported_module")
    templates: dict[str, MergedModule] = {}
    present: set[str] = {m.spec.name for m in modules}
    layers: set[int] = set()
    for module in modules:
        found = _layer_template(module.spec.name)
        if found is not None:
            templates.setdefault(found[0], module)
            layers.add(found[1])
    for template, example in sorted(templates.items()):
        for layer in sorted(layers):
            name = template.format(layer)
            if name not in present:
                modules.append(_zero_like(example, name))
    return modules


def _zero_like(example: MergedModule, name: str) -> MergedModule:
    rank = example.B.shape[1]
    spec = dataclasses.replace(example.spec, name=name)
    return MergedModule(spec, torch.zeros(spec.out_features, rank),
                        torch.zeros(rank, spec.in_features))


def conform_config(config: Mapping[str, Any], modules: Sequence[MergedModule], *,
                   target: str | None, base_model_name: str | None) -> dict[str, Any]:
    """The output config with the target's needs: explicit target modules, the base name."""
    out = dict(config)
    if base_model_name is not None:
        out["base_model_name_or_path"] = base_model_name
    if target is not None:
        out["target_modules"] = sorted({m.spec.name.rsplit(".", 1)[-1] for m in modules})
    return out
