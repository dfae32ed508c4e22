"""Write PEFT LoRA adapters that PEFT, vLLM and LoRAX load as they are.

Output adapters have one rank everywhere: ``r = lora_alpha = rank`` (scale 1),
``use_rslora = false`` and no patterns; modules whose merge came out at a lower rank are
padded with zero rows/columns, which leaves their delta unchanged. The directory is built
beside the destination and renamed into place, so a reader never sees half an adapter.

`AdapterWriter` streams: each module's factors go to disk as the merge finishes them
(`safetensors_writer`), so the writer holds no more than the module in hand; the config,
lineage and report are written when the last module is in.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from lorafold.adapters.config import LoraSettings, union_target_modules
from lorafold.adapters.reader import ModuleSpec
from lorafold.adapters.safetensors_writer import SafetensorsWriter, entry_bytes
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


def stored_shapes(spec: ModuleSpec, rank: int) -> dict[str, tuple[int, ...]]:
    """The stored shapes of a module's two factors at output rank `rank`."""
    return {spec.b_key: (spec.out_features, rank, *spec.b_shape[2:]),
            spec.a_key: (rank, *spec.a_shape[1:])}


def header_reserve(specs: Iterable[ModuleSpec], rank: int, dtype: torch.dtype,
                   lineage: Mapping[str, Any]) -> int:
    """Header bytes to leave for these modules and a lineage like `lorafold.json`'s: each
    entry at its longest, the lineage as JSON, and slack for what only the end knows."""
    shapes = [shape for spec in specs for shape in stored_shapes(spec, rank).items()]
    total = sum(math.prod(shape) for _, shape in shapes) * dtype.itemsize
    entries = sum(entry_bytes(key, dtype, shape, total) + 1 for key, shape in shapes)
    return entries + 2 * len(_lineage_metadata(lineage)) + 4096


def _lineage_metadata(lineage: Mapping[str, Any]) -> str:
    return json.dumps({"format": "pt",
                       LINEAGE_METADATA_KEY: json.dumps(lineage, sort_keys=True, default=str)})


class AdapterWriter:
    """Write a PEFT adapter dir module by module, atomically: `add` each module, then
    `finish`. Leaving the context without `finish` (an error, a cancellation) removes
    everything written; the destination is only replaced by `finish`.

    `reserve`: header bytes to leave (see `header_reserve`); too small only costs a copy.
    """

    def __init__(self, out_dir: Path, *, rank: int, dtype: torch.dtype, reserve: int) -> None:
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.dtype = dtype
        self.written: list[ModuleSpec] = []
        self._staging = staging_dir(self.out_dir)
        try:
            self._weights = SafetensorsWriter(self._staging / WEIGHTS_NAME, reserve=reserve)
        except BaseException:
            shutil.rmtree(self._staging, ignore_errors=True)
            raise
        self._finished = False

    def add(self, module: MergedModule) -> None:
        """Check, pad and cast one module's factors and write them."""
        for key, tensor in sorted(_stored_tensors(module, self.rank, self.dtype).items()):
            self._weights.add(key, tensor)
        self.written.append(module.spec)

    def finish(self, *, config: Mapping[str, Any], lineage: Mapping[str, Any],
               report: Mapping[str, Any] | None = None) -> Path:
        """Write the header, config and `lorafold.json`, then move the dir into place.

        The lineage goes into the weights' metadata and `lorafold.json`; the (larger) merge
        report only into `lorafold.json`.
        """
        if int(config["r"]) != self.rank:
            raise ValueError(f"config r={config['r']} but the modules were written at "
                             f"rank {self.rank}")
        self._weights.finish({"format": "pt",
                              LINEAGE_METADATA_KEY: json.dumps(lineage, sort_keys=True,
                                                               default=str)})
        _write_json(self._staging / CONFIG_NAME, config)
        _write_json(self._staging / LINEAGE_NAME,
                    {**lineage, "report": report} if report is not None else lineage)
        publish_directory(self._staging, self.out_dir)
        self._finished = True
        return self.out_dir.resolve()

    def discard(self) -> None:
        """Remove what was written (nothing once `finish` published it)."""
        self._weights.close()
        if not self._finished:
            shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> AdapterWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.discard()


def write_adapter(out_dir: Path, modules: Sequence[MergedModule], *,
                  config: Mapping[str, Any], lineage: Mapping[str, Any],
                  report: Mapping[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write a PEFT adapter dir atomically from modules in hand; returns the final path."""
    rank = int(config["r"])
    reserve = header_reserve((m.spec for m in modules), rank, dtype, lineage)
    with AdapterWriter(Path(out_dir), rank=rank, dtype=dtype, reserve=reserve) as writer:
        for module in modules:
            writer.add(module)
        return writer.finish(config=config, lineage=lineage, report=report)
