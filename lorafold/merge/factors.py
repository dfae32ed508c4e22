"""One module's input factors, stored side by side as the core space wants them.

`core_space` works on B̂ = [s_1B_1 … s_TB_T] (m×R) and Â = [A_1; …; A_T] (R×n). Upcasting
each input, scaling it and then concatenating costs three passes over the stack; writing
each input's upcast straight into its block of B̂ and Â, then scaling B̂ in one pass, costs
two (a 70B-shaped merge: the concatenation alone took 1.0 of 14 s). The per-input pairs
every method also sees are views of those blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch


class StackedFactors(Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """(s_t·B_t, A_t) for each input, as column blocks of `b` (m×R) and row blocks of `a`
    (R×n)."""

    def __init__(self, b: torch.Tensor, a: torch.Tensor, ranks: Sequence[int]) -> None:
        self.b, self.a = b, a
        starts = [sum(ranks[:t]) for t in range(len(ranks))]
        self.blocks = tuple(slice(s, s + r) for s, r in zip(starts, ranks, strict=True))

    def __len__(self) -> int:
        return len(self.blocks)

    @overload
    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def __getitem__(self, index: int | slice,
                    ) -> tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor,
                                                                         torch.Tensor]]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        block = self.blocks[index]
        return self.b[:, block], self.a[block]


def stack_factors(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                  device: torch.device | str = "cpu") -> StackedFactors:
    """(B_t, A_t, s_t) as stored (any float dtype, any device) → float32 StackedFactors on
    `device`, B scaled. The scaling is done in float32, after the upcast, as before."""
    ranks = [b.shape[1] for b, _, _ in parts]
    total = sum(ranks)
    rows, cols = parts[0][0].shape[0], parts[0][1].shape[1]
    b = torch.empty(rows, total, dtype=torch.float32, device=device)
    a = torch.empty(total, cols, dtype=torch.float32, device=device)
    stacked = StackedFactors(b, a, ranks)
    scales = torch.empty(total, dtype=torch.float32)
    for (b_t, a_t, scale), block in zip(parts, stacked.blocks, strict=True):
        b[:, block].copy_(b_t.to(device))        # moved as stored, upcast where it lands
        a[block].copy_(a_t.to(device))
        scales[block] = scale
    b.mul_(scales.to(device))
    return stacked


def stacked(factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """B̂ (m×R) and Â (R×n): as held, or concatenated."""
    if isinstance(factors, StackedFactors):
        return factors.b, factors.a
    return torch.cat([b for b, _ in factors], dim=1), torch.cat([a for _, a in factors], dim=0)
