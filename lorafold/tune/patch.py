"""A base model with low-rank deltas added by forward hooks: never an m×n weight.

Each patched module's output gets `delta(x)` added, computed thin side first
(x ↦ ((x Aᵀ) Mᵀ) Bᵀ), so a candidate costs its factors only and gradients reach whatever
the delta function closes over (the learned weights). Linear layers, transformers' GPT-2
Conv1D (the adapter's canonical delta is out×in either way) and embeddings are supported;
the check runs before any hook is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafold.adapters.config import model_path
from lorafold.adapters.reader import ModuleSpec
from lorafold.errors import IncompatibleAdapters

# x (the module's input) -> its extra output
Delta = Callable[[torch.Tensor], torch.Tensor]
Chain = tuple[torch.Tensor, ...]     # (A, [M,] B): delta(x) = x Aᵀ [Mᵀ] Bᵀ


def chain_delta(spec: ModuleSpec, chain: Callable[[], Chain]) -> Delta:
    """The delta of a module whose merged ΔW = B [M] A, with the factors read at call time
    (so a patch can follow parameters that change between steps)."""
    embedding = spec.kind == "embedding"

    def delta(x: torch.Tensor) -> torch.Tensor:
        a, *rest = chain()
        y = F.embedding(x, a.T) if embedding else x @ a.to(x.dtype).T
        for factor in rest:
            y = y @ factor.to(y.dtype).T
        return y
    return delta


def fixed_delta(spec: ModuleSpec, a: torch.Tensor, b: torch.Tensor) -> Delta:
    """The delta x ↦ x Aᵀ Bᵀ of fixed factors (ΔW = B A)."""
    chain: Chain = (a, b)
    return chain_delta(spec, lambda: chain)


def _check_kind(spec: ModuleSpec) -> None:
    if spec.kind not in ("linear", "embedding"):
        raise IncompatibleAdapters(f"{spec.name}: tuning supports linear and embedding "
                                   f"modules, not {spec.kind}", code="tune_unsupported_module",
                                   module=spec.name)


@contextlib.contextmanager
def patched(model: nn.Module, deltas: Mapping[str, tuple[ModuleSpec, Delta]],
            ) -> Iterator[nn.Module]:
    """`model` with `deltas` (by adapter module name) added to those modules' outputs."""
    for spec, _ in deltas.values():
        _check_kind(spec)
    handles = []
    try:
        for name, (_, delta) in deltas.items():
            module = model.get_submodule(model_path(name))

            def hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor,
                     delta: Delta = delta) -> torch.Tensor:
                return out + delta(args[0]).to(out.dtype)
            handles.append(module.register_forward_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()
