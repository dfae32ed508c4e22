"""Write PEFT LoRA adapters that PEFT, vLLM and LoRAX load as they are.

Output adapters have one rank everywhere: ``r = lora_alpha = rank`` (scale 1),
``use_rslora = false`` and no patterns; modules whose merge came out at a lower rank are
padded with zero rows/columns, which leaves their delta unchanged. The directory is built
beside the destination and renamed into place, so a reader never sees half an adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lorafold.adapters.config import LoraSettings, union_target_modules
from lorafold.adapters.reader import ModuleSpec
from lorafold.adapters.source import CONFIG_NAME, WEIGHTS_NAME
from lorafold.adapters.tensor_file import all_finite
from lorafold.errors import IncompatibleAdapters, NumericalError

LINEAGE_NAME = "lorafold.json"
LINEAGE_METADATA_KEY = "lorafold.lineage"


@dataclass(frozen=True)
class MergedModule:
    """Output factors for one module, canonical (B m×k, A k×n, delta = B @ A), k ≤ rank."""

    spec: ModuleSpec
    B: torch.Tensor
    A: torch.Tensor


def output_config(inputs: Iterable[LoraSettings], rank: int) -> dict[str, Any]:
    """Config of a merged adapter: the first input's, with the math-changing fields reset."""
    settings = list(inputs)
    fan = {s.fan_in_fan_out for s in settings}
    if len(fan) > 1:
        raise IncompatibleAdapters("inputs disagree on fan_in_fan_out (Conv1D vs Linear "
                                   "layers): they are not for the same model architecture",
                                   code="fan_in_fan_out_mismatch")
    config = dict(settings[0].raw)
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        values = {json.dumps(s.raw.get(key), sort_keys=True) for s in settings}
        if len(values) > 1:
            config.pop(key, None)
    config.update({
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": union_target_modules([s.target_modules for s in settings]),
        "fan_in_fan_out": settings[0].fan_in_fan_out,
        "base_model_name_or_path": settings[0].base_model_name_or_path,
        "inference_mode": True,
    })
    return config


def _padded(tensor: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """`tensor` zero-padded to `shape` in `dtype`; itself, not a copy, when it already fits.

    Not copying full-rank modules keeps a merge's peak memory at one copy of its output.
    """
    tensor = tensor.detach().to("cpu")
    if tuple(tensor.shape) == shape:
        return tensor.to(dtype).contiguous()
    out = torch.zeros(shape, dtype=dtype)
    out[: tensor.shape[0], : tensor.shape[1]] = tensor
    return out


def _stored_tensors(module: MergedModule, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    spec = module.spec
    k = module.B.shape[1]
    if k > rank:
        raise ValueError(f"{spec.name}: merged rank {k} exceeds output rank {rank}")
    if not (all_finite(module.A) and all_finite(module.B)):
        raise NumericalError(f"{spec.name}: merge produced NaN/Inf; nothing written")
    b = _padded(module.B, (spec.out_features, rank), dtype)
    a = _padded(module.A, (rank, spec.in_features), dtype)
    b_shape = (spec.out_features, rank, *spec.b_shape[2:])
    a_shape = (rank, *spec.a_shape[1:])
    return {spec.b_key: b.reshape(b_shape), spec.a_key: a.reshape(a_shape)}


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n",
                    encoding="utf-8")


def publish_directory(staging: Path, out_dir: Path) -> None:
    """Move a finished staging dir into place; an existing output is replaced whole."""
    out_dir = out_dir.resolve()
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def staging_dir(out_dir: Path) -> Path:
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def write_adapter(out_dir: Path, modules: Iterable[MergedModule], *, config: Mapping[str, Any],
                  lineage: Mapping[str, Any], report: Mapping[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write a PEFT adapter dir atomically; returns the final path.

    The lineage goes into the weights' metadata and `lorafold.json`; the (larger) merge
    report only into `lorafold.json`.
    """
    rank = int(config["r"])
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        tensors.update(_stored_tensors(module, rank, dtype))
    staging = staging_dir(out_dir)
    try:
        metadata = {"format": "pt",
                    LINEAGE_METADATA_KEY: json.dumps(lineage, sort_keys=True, default=str)}
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata=metadata)
        _write_json(staging / CONFIG_NAME, config)
        _write_json(staging / LINEAGE_NAME,
                    {**lineage, "report": report} if report is not None else lineage)
        publish_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir.resolve()
