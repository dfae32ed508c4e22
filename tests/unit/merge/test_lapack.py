"""The GIL-free partial eigensolver: LAPACK's answer, and the GIL really released."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from lorafold.merge import lapack


def _gram(size: int, dtype: type, seed: int) -> np.ndarray:
    x: np.ndarray = np.random.default_rng(seed).standard_normal((size, size)).astype(dtype)
    return x @ np.diag(np.logspace(0, -3, size).astype(dtype)) @ x.T


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("size", "rank"), [(40, 1), (300, 16), (300, 150)])
def test_partial_eigh_is_the_full_eigh_top_r(dtype: type, size: int, rank: int) -> None:
    gram = _gram(size, dtype, seed=size + rank)
    before = gram.copy()
    values, vectors = lapack.partial_eigh(gram, rank)
    full_values, full_vectors = np.linalg.eigh(gram.astype(np.float64))
    tol = 1e-5 if dtype is np.float32 else 1e-12
    assert values.dtype == vectors.dtype == np.dtype(dtype)
    assert vectors.shape == (size, rank)
    assert np.allclose(values, full_values[-rank:], rtol=0, atol=tol * full_values[-1])
    overlap = np.abs(np.sum(vectors * full_vectors[:, -rank:], axis=0))    # distinct values
    assert np.allclose(overlap, 1.0, atol=100 * tol)
    assert np.array_equal(gram, before)                                   # input untouched


def test_side_by_side_gives_the_same_answers_as_in_turn() -> None:
    grams = [_gram(300, np.float32, seed=s) for s in range(3)]
    in_turn = lapack.partial_eighs(grams, 8, blas_threads=1, parallel=False)
    side = lapack.partial_eighs(grams, 8, blas_threads=1, parallel=True)
    for (v1, x1), (v2, x2) in zip(in_turn, side, strict=True):
        assert np.array_equal(v1, v2) and np.array_equal(x1, x2)


def test_an_error_in_a_helper_thread_reaches_the_caller() -> None:
    grams = [_gram(50, np.float32, seed=0).astype(np.float16), _gram(50, np.float32, seed=1)]
    with pytest.raises(KeyError):                  # no LAPACK routine for float16
        lapack.partial_eighs(grams, 4, blas_threads=1, parallel=True)


def test_the_solver_is_called_without_the_gil() -> None:
    """The reason the module exists. ctypes releases the GIL around a foreign function
    unless it is declared with the Python API flag (PYFUNCTYPE); scipy's own wrapper
    holds it (measured in the module docstring)."""
    solver = lapack._routine("dsyevr")
    assert solver is not None
    flags = solver._flags_                                  # type: ignore[attr-defined]
    assert flags & ctypes._FUNCFLAG_CDECL                   # type: ignore[attr-defined]
    assert not flags & ctypes._FUNCFLAG_PYTHONAPI           # type: ignore[attr-defined]
