"""Saved LoRA adapters as dense deltas, keyed by the base model's parameter names: how the
quality benchmarks add an adapter (own or merged) to a base model's weights."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafold.adapters.config import PEFT_PREFIX
from lorafold.adapters.reader import open_adapter

Deltas = dict[str, torch.Tensor]          # model parameter name -> dense ΔW (out × in)


def read_deltas(adapter_dir: Path) -> Deltas:
    """Dense ΔW = scale·B·A per module of a PEFT LoRA dir, keyed by parameter name."""
    deltas: Deltas = {}
    with open_adapter(adapter_dir) as adapter:
        for factors in adapter.iter_modules():
            if factors.spec.kind != "linear" or adapter.config.fan_in_fan_out:
                raise ValueError(f"{factors.spec.name}: only plain Linear LoRA is expected")
            name = factors.spec.name.removeprefix(PEFT_PREFIX) + ".weight"
            deltas[name] = factors.scale * (factors.B.float() @ factors.A.float())
    return deltas
