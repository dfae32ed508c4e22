"""PEFT LoRA adapter format: read (lazily, validated), write, lineage."""

from lorafold.adapters.config import LoraSettings, parse_config, union_target_modules
from lorafold.adapters.reader import LoraAdapter, LoraFactors, ModuleSpec, open_adapter
from lorafold.adapters.writer import MergedModule, output_config, write_adapter

__all__ = [
    "LoraAdapter",
    "LoraFactors",
    "LoraSettings",
    "MergedModule",
    "ModuleSpec",
    "open_adapter",
    "output_config",
    "parse_config",
    "union_target_modules",
    "write_adapter",
]
