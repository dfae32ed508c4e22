"""LAPACK's partial symmetric eigensolver (?syevr), called with the GIL released.

scipy's `linalg.eigh` wrappers hold the GIL for the whole solve, so the two k×k
eigenproblems of CtM's HOSVD start could not run side by side on two cores (two threads:
68–81 ms against 73–74 ms in turn, k = 1,024, float32). The same LAPACK routines are
published as C function pointers in `scipy.linalg.cython_lapack` (its public Cython API);
called through ctypes, which releases the GIL around a foreign call, two solves overlap:
38–48 against 76 ms here. numba reaches scipy's LAPACK the same way
(`numba.extending.get_cython_function_address`).

Only the eigenvectors of the `rank` largest eigenvalues are computed (RANGE = 'I'), as
`scipy.linalg.eigh(..., subset_by_index=..., driver="evr")` does; where the pointer
cannot be found this falls back to that call.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np

_Solver = Callable[..., None]
_ROUTINES = {np.dtype(np.float32): ("ssyevr", ctypes.c_float),
             np.dtype(np.float64): ("dsyevr", ctypes.c_double)}


@cache
def _routine(name: str) -> _Solver | None:
    """The C function pointer scipy publishes for LAPACK routine `name`, as a ctypes
    function of 21 pointers (Fortran passes every argument by reference); None if absent."""
    try:
        from scipy.linalg import cython_lapack
        capsule = cython_lapack.__pyx_capi__[name]
    except (ImportError, AttributeError, KeyError):
        return None
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 21)(address) if address else None


def partial_eigh(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The `rank` largest eigenvalues (ascending) of a symmetric float32/float64 matrix and
    their eigenvectors (n×rank), like scipy's eigh with subset_by_index=(n − rank, n − 1).
    `matrix` is not modified."""
    n = matrix.shape[0]
    solver = _routine(_ROUTINES[matrix.dtype][0])
    if solver is None:
        from scipy.linalg import eigh
        values, vectors = eigh(matrix, subset_by_index=(n - rank, n - 1), driver="evr",
                               check_finite=False)
        return values, vectors
    real = _ROUTINES[matrix.dtype][1]
    a = np.array(matrix, order="F", copy=True)     # overwritten by the solver
    values = np.empty(n, dtype=a.dtype)
    vectors = np.empty((n, rank), dtype=a.dtype, order="F")
    support = np.empty(2 * rank, dtype=np.intc)
    found, info = ctypes.c_int(0), ctypes.c_int(0)
    jobz, span, uplo = (ctypes.byref(ctypes.c_char(flag)) for flag in (b"V", b"I", b"L"))
    order = lda = ldz = ctypes.byref(ctypes.c_int(n))    # (a reference keeps its value alive)
    low = high = tol = ctypes.byref(real(0.0))  # vl, vu unused by index; abstol 0: the default
    first, last = ctypes.byref(ctypes.c_int(n - rank + 1)), ctypes.byref(ctypes.c_int(n))

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        solver(jobz, span, uplo, order, a.ctypes.data, lda, low, high, first, last, tol,
               ctypes.byref(found), values.ctypes.data, vectors.ctypes.data, ldz,
               support.ctypes.data, work.ctypes.data, ctypes.byref(ctypes.c_int(lwork)),
               iwork.ctypes.data, ctypes.byref(ctypes.c_int(liwork)), ctypes.byref(info))

    sizes, isizes = np.zeros(1, dtype=a.dtype), np.zeros(1, dtype=np.intc)
    call(sizes, -1, isizes, -1)                    # workspace query
    lwork, liwork = int(sizes[0]), int(isizes[0])
    call(np.empty(lwork, dtype=a.dtype), lwork, np.empty(liwork, dtype=np.intc), liwork)
    if info.value != 0 or found.value != rank:
        raise np.linalg.LinAlgError(f"{_ROUTINES[a.dtype][0]} failed: info {info.value}, "
                                    f"{found.value} of {rank} eigenpairs")
    return values[:rank], vectors


@cache
def _blas_threads() -> Any:
    """threadpoolctl's handle on the BLAS that scipy's LAPACK calls, found once scipy's
    LAPACK is loaded (a controller made before that would not see it)."""
    from scipy.linalg import cython_lapack  # noqa: F401
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()


def partial_eighs(matrices: Sequence[np.ndarray], rank: int, *, blas_threads: int,
                  parallel: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """`partial_eigh` of each matrix, each solve on `blas_threads` BLAS threads; with
    `parallel`, the first ones each in a thread of their own while the caller solves the
    last (the solver releases the GIL). A plain thread per call, no pool: nothing outlives
    the call, so a fork (RQ's work horse) never inherits a pool's dead threads."""
    with _blas_threads().limit(limits=blas_threads, user_api="blas"):
        if not parallel or len(matrices) < 2:
            return [partial_eigh(m, rank) for m in matrices]
        return _in_threads(matrices, rank)


def _in_threads(matrices: Sequence[np.ndarray], rank: int,
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    results: list[tuple[np.ndarray, np.ndarray] | BaseException | None] = [None] * len(matrices)

    def solve(index: int) -> None:
        try:
            results[index] = partial_eigh(matrices[index], rank)
        except BaseException as error:                   # handed to the caller below
            results[index] = error

    helpers = [threading.Thread(target=solve, args=(i,), name="eigh")
               for i in range(len(matrices) - 1)]
    for helper in helpers:
        helper.start()
    solve(len(matrices) - 1)
    for helper in helpers:
        helper.join()
    solved = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        solved.append(result)
    return solved
