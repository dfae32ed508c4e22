"""The symmetric products the core-space algebra is built from."""

from __future__ import annotations

import pytest
import torch

from lorafold.merge.gram import gram_matrix
from lorafold.merge.subspaces import _square_root


@pytest.mark.parametrize(("rows", "columns"),
                         [(300, 7), (300, 255), (8200, 128), (1100, 1001), (1024, 1024)])
def test_gram_matrix_is_xt_x_and_exactly_symmetric(rows: int, columns: int) -> None:
    """One GEMM for small products, panels (the last one narrower where 4 does not divide
    the width) from MIN_BLOCKED_ENTRIES on."""
    x = torch.randn(rows, columns, generator=torch.Generator().manual_seed(columns),
                    dtype=torch.float64)
    got = gram_matrix(x)
    assert torch.equal(got, got.T)
    assert float((got - x.T @ x).norm() / (x.T @ x).norm()) < 1e-14


def test_gram_matrix_keeps_the_dtype_and_takes_views() -> None:
    x = torch.randn(4096, 300, generator=torch.Generator().manual_seed(0))
    got = gram_matrix(x.T.contiguous().T)          # a column-major view
    assert got.dtype == torch.float32
    assert float((got.double() - x.double().T @ x.double()).abs().max()) < 1e-3


def test_square_root_of_padded_zeroed_and_rank_deficient_blocks() -> None:
    g = torch.Generator().manual_seed(1)
    full = torch.randn(6, 4, generator=g, dtype=torch.float64)
    padded = full.clone()
    padded[:, 3] = 0                                  # a zero-padded column
    deficient = full.clone()
    deficient[:, 2] = deficient[:, 0] + deficient[:, 1]  # rank 3, no zero column
    factors = torch.stack([full, padded, torch.zeros(6, 4, dtype=torch.float64)])
    for batch in (factors, torch.cat([factors, deficient.unsqueeze(0)])):
        inner = batch.transpose(1, 2) @ batch
        root = _square_root(inner)
        assert float((root.transpose(1, 2) @ root - inner).abs().max()) < 1e-12
