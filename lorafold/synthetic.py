"""Random PEFT LoRA adapters with given module shapes, for the demo, benchmarks and tests.

They are real PEFT-format directories (config + safetensors) that load like trained ones;
their factors are Gaussian, with B not zero-initialised, so every delta is non-trivial.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lorafold.adapters.config import PEFT_PREFIX


def llama_module_shapes(layers: int, *, hidden: int = 4096, intermediate: int = 11008,
                        modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"),
                        ) -> dict[str, tuple[int, int]]:
    """Module name (as in a Llama model) -> (out, in) of its weight."""
    shapes = {"q_proj": ("self_attn", hidden, hidden), "k_proj": ("self_attn", hidden, hidden),
              "v_proj": ("self_attn", hidden, hidden), "o_proj": ("self_attn", hidden, hidden),
              "gate_proj": ("mlp", intermediate, hidden), "up_proj": ("mlp", intermediate, hidden),
              "down_proj": ("mlp", hidden, intermediate)}
    out = {}
    for layer in range(layers):
        for name in modules:
            block, o, i = shapes[name]
            out[f"model.layers.{layer}.{block}.{name}"] = (o, i)
    return out


def write_random_adapter(directory: Path, shapes: Mapping[str, tuple[int, int]], *, rank: int,
                         alpha: float | None = None, seed: int = 0,
                         dtype: torch.dtype = torch.float32,
                         base_model: str = "synthetic/llama",
                         config_overrides: Mapping[str, Any] | None = None) -> Path:
    """Write a PEFT LoRA dir whose modules have Gaussian factors (std 1/sqrt(dim))."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (out_features, in_features) in shapes.items():
        a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        b = torch.randn(out_features, rank, generator=generator) / rank**0.5
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name in shapes})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank, "lora_dropout": 0.0,
        "target_modules": leaf_names, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model, "inference_mode": True,
    }
    config.update(config_overrides or {})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
