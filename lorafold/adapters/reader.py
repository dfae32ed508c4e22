"""Read a PEFT LoRA adapter lazily, one module at a time, after validating all of it.

Opening an adapter checks the config, the safetensors header and every key and shape
without reading tensor data. `load(module)` copies one module's two factors out of the file
(plain reads, no memory map: see `tensor_file`) and refuses NaN/Inf. `validate()` runs that
over every module, for uploads.

Every layer kind is reduced to the same canonical factors: ``delta = scale * B @ A`` with
B (m×r) and A (r×n). Linear: as stored. Conv2d: B is out×r×1×1 and A r×in×kh×kw, flattened.
Embedding: PEFT's lora_embedding_B (dim×r) @ lora_embedding_A (r×vocab), transposed only
when applied to the weight. fan_in_fan_out (GPT-2 Conv1D) transposes the delta when applied,
not the factors. The merge math therefore never needs to know the layer kind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from lorafold.adapters.config import LoraSettings, parse_config
from lorafold.adapters.safetensors_header import DEFAULT_HEADER_LIMIT, TensorInfo, read_header
from lorafold.adapters.source import AdapterSource, check_files, resolve_source
from lorafold.adapters.tensor_file import TensorFile, all_finite, torch_dtype
from lorafold.errors import InvalidAdapter

ModuleKind = Literal["linear", "embedding", "conv2d"]
MAX_CONFIG_BYTES = 1024 * 1024  # a PEFT config is a few hundred bytes to a few KiB

_FACTOR_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<lin>lora_[AB])\.weight|(?P<emb>lora_embedding_[AB]))$")


@dataclass(frozen=True)
class ModuleSpec:
    """What a module is, from the header alone."""

    name: str               # PEFT module key without the factor suffix
    kind: ModuleKind
    rank: int
    out_features: int       # m: rows of the canonical B
    in_features: int        # n: columns of the flattened A
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: str
    scale: float

    @property
    def delta_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def a_key(self) -> str:
        return f"{self.name}.lora_embedding_A" if self.kind == "embedding" \
            else f"{self.name}.lora_A.weight"

    @property
    def b_key(self) -> str:
        return f"{self.name}.lora_embedding_B" if self.kind == "embedding" \
            else f"{self.name}.lora_B.weight"


@dataclass(frozen=True)
class LoraFactors:
    """One module's canonical factors: delta = scale * B @ A."""

    spec: ModuleSpec
    A: torch.Tensor
    B: torch.Tensor

    @property
    def scale(self) -> float:
        return self.spec.scale


def _unexpected(key: str) -> InvalidAdapter:
    if key.endswith("lora_magnitude_vector") or ".lora_magnitude_vector" in key:
        return InvalidAdapter(f"{key}: DoRA magnitude vector; DoRA adapters are not supported",
                              code="dora_not_supported")
    if re.search(r"\.lora_B(\.[^.]+)?\.bias$", key):
        return InvalidAdapter(f"{key}: LoRA bias terms are not supported",
                              code="lora_bias_not_supported")
    if "modules_to_save" in key:
        return InvalidAdapter(f"{key}: full-weight modules_to_save tensors are not supported",
                              code="modules_to_save_not_supported")
    if key.endswith(".bias"):
        return InvalidAdapter(f"{key}: trained base-model biases are not supported",
                              code="bias_not_supported")
    return InvalidAdapter(f"{key}: not a LoRA factor (expected '<module>.lora_A.weight', "
                          "'<module>.lora_B.weight' or lora_embedding_A/B)",
                          code="unexpected_key")


def _module_spec(name: str, kind: ModuleKind, a: TensorInfo, b: TensorInfo,
                 settings: LoraSettings) -> ModuleSpec:
    def bad(msg: str) -> InvalidAdapter:
        return InvalidAdapter(f"{name}: {msg}", code="shape_mismatch")

    if kind == "linear" and len(a.shape) == 4:
        kind = "conv2d"
    expected_ndim = 4 if kind == "conv2d" else 2
    if len(a.shape) != expected_ndim or len(b.shape) != expected_ndim:
        raise InvalidAdapter(f"{name}: factors of shape {list(a.shape)} / {list(b.shape)} are "
                             "not a supported layer (Linear, Embedding, Conv2d)",
                             code="unsupported_layer")
    if kind == "conv2d" and tuple(b.shape[2:]) != (1, 1):
        raise bad(f"conv lora_B must be out×r×1×1, got {list(b.shape)}")
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise bad(f"A is {list(a.shape)} and B is {list(b.shape)}: their ranks "
                  f"({rank} vs {b.shape[1]}) differ")
    expected = settings.rank_for(name)
    if rank != expected:
        raise InvalidAdapter(f"{name}: factors have rank {rank} but the config says r="
                             f"{expected} for this module (r / rank_pattern)",
                             code="rank_mismatch")
    if a.dtype != b.dtype:
        raise bad(f"A is {a.dtype} and B is {b.dtype}")
    in_features = 1
    for d in a.shape[1:]:
        in_features *= d
    if rank == 0 or in_features == 0 or b.shape[0] == 0:
        raise bad("empty factor")
    return ModuleSpec(name=name, kind=kind, rank=rank, out_features=b.shape[0],
                      in_features=in_features, a_shape=a.shape, b_shape=b.shape,
                      dtype=a.dtype, scale=settings.scale_for(name))


def _module_specs(tensors: dict[str, TensorInfo], settings: LoraSettings) -> dict[str, ModuleSpec]:
    halves: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, ModuleKind] = {}
    for key, info in tensors.items():
        match = _FACTOR_KEY.match(key)
        if match is None:
            raise _unexpected(key)
        module = match["module"]
        part = (match["lin"] or match["emb"])[-1]
        kind: ModuleKind = "embedding" if match["emb"] else "linear"
        if kinds.setdefault(module, kind) != kind:
            raise InvalidAdapter(f"{module}: mixes lora_A/B and lora_embedding_A/B keys",
                                 code="unexpected_key")
        halves.setdefault(module, {})[part] = info
    specs: dict[str, ModuleSpec] = {}
    for module, parts in sorted(halves.items()):
        missing = {"A", "B"} - parts.keys()
        if missing:
            have = next(iter(parts.values())).name
            raise InvalidAdapter(f"{have}: its lora_{missing.pop()} half is missing",
                                 code="missing_pair")
        specs[module] = _module_spec(module, kinds[module], parts["A"], parts["B"], settings)
    if not specs:
        raise InvalidAdapter("adapter_model.safetensors holds no LoRA factors",
                             code="empty_adapter")
    return specs


class LoraAdapter:
    """An opened, validated adapter. Use as a context manager, or call `close()`."""

    def __init__(self, source: AdapterSource, *, header_limit: int = DEFAULT_HEADER_LIMIT,
                 label: str | None = None, sha256: str | None = None) -> None:
        self._source = source
        try:
            self.directory = source.directory
            self.label = label or str(self.directory)
            config_path, self.weights_path = check_files(self.directory)
            if config_path.stat().st_size > MAX_CONFIG_BYTES:
                raise InvalidAdapter(f"adapter_config.json is larger than {MAX_CONFIG_BYTES} "
                                     "bytes", code="invalid_config")
            try:
                raw = json.loads(config_path.read_text(encoding="utf-8"))
            # ValueError: also an integer of more digits than Python converts; RecursionError:
            # nesting deeper than the parser recurses. Both are the file's fault.
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise InvalidAdapter(f"adapter_config.json is not valid JSON: {e}",
                                     code="invalid_config") from e
            if not isinstance(raw, dict):
                raise InvalidAdapter("adapter_config.json is not a JSON object",
                                     code="invalid_config")
            self.config: LoraSettings = parse_config(raw)
            header = read_header(self.weights_path, limit=header_limit)
            self.metadata = header.metadata
            self._tensors = header.tensors
            self.modules: dict[str, ModuleSpec] = _module_specs(header.tensors, self.config)
            self.size_bytes = self.weights_path.stat().st_size
            try:
                self._file = TensorFile(self.weights_path, header.data_start, sha256=sha256)
            except OSError as e:
                raise InvalidAdapter(f"adapter_model.safetensors: {e}",
                                     code="malformed_safetensors") from e
        except BaseException:
            source.cleanup()
            raise

    @property
    def sha256(self) -> str:
        """sha256 of adapter_model.safetensors: as given when opened (already verified), else
        mostly from the bytes `load` already read."""
        return self._file.sha256()

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(next(iter(self.modules.values())).dtype)

    def load(self, module: str, *, device: torch.device | str = "cpu",
             check_finite: bool = True) -> LoraFactors:
        """The module's canonical factors in their stored dtype, refusing NaN/Inf (unless
        `check_finite` is False: a caller that checks its own upcast copy, and loads again
        with the check to name the tensor when that copy is not finite)."""
        spec = self.modules[module]
        a = self._read(spec.a_key, check_finite)
        b = self._read(spec.b_key, check_finite)
        a = a.reshape(spec.rank, spec.in_features).to(device)
        b = b.reshape(spec.out_features, spec.rank).to(device)
        return LoraFactors(spec, a, b)

    def _read(self, key: str, check_finite: bool = True) -> torch.Tensor:
        try:
            tensor = self._file.read(self._tensors[key])
        except OSError as e:
            raise InvalidAdapter(f"{key}: cannot be read: {e}",
                                 code="malformed_safetensors") from e
        if check_finite and not all_finite(tensor):
            raise InvalidAdapter(f"{key}: contains NaN or Inf values", code="non_finite")
        return tensor

    def iter_modules(self) -> Iterator[LoraFactors]:
        for name in self.modules:
            yield self.load(name)

    def validate(self) -> None:
        """Read every module once: finiteness and readability of all tensor data."""
        for _ in self.iter_modules():
            pass

    def summary(self) -> dict[str, Any]:
        """What `lorafold inspect` and the API show about an adapter."""
        ranks = sorted({m.rank for m in self.modules.values()})
        kinds = sorted({m.kind for m in self.modules.values()})
        return {
            "base_model": self.config.base_model_name_or_path,
            "r": self.config.r,
            "alpha": self.config.lora_alpha,
            "use_rslora": self.config.use_rslora,
            "ranks": ranks,
            "layer_kinds": kinds,
            "target_modules": self.config.target_modules,
            "fan_in_fan_out": self.config.fan_in_fan_out,
            "module_count": len(self.modules),
            "parameters": sum(m.rank * (m.in_features + m.out_features)
                              for m in self.modules.values()),
            "dtype": str(self.dtype).removeprefix("torch."),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
        }

    def close(self) -> None:
        self._file.close()
        self._source.cleanup()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_adapter(source: Path | str | bytes, *, header_limit: int = DEFAULT_HEADER_LIMIT,
                 label: str | None = None, sha256: str | None = None) -> LoraAdapter:
    """Open and validate (structure only) an adapter from a dir, archive path or bytes.

    `sha256`: the weights file's digest, when the caller has already verified it (the
    service, which checks every download); the adapter then never hashes the file itself.
    """
    return LoraAdapter(resolve_source(source), header_limit=header_limit, label=label,
                       sha256=sha256)
