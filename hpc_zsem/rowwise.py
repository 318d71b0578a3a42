"""Matrix products whose rows do not depend on the batch: row i of A·B depends only on A[i] and B, bit for bit.

BLAS takes other code paths — with other roundings — depending on the shape: numpy calls gemv for one row, and
OpenBLAS's kernels and blocking change with the number of rows (measured here: 8×8 patches with H = 64 differ
for 1-row batches, 12×12 patches for up to 65 rows, products with Wᵀ for up to 18). The estimation pass batches
patches by tile, so with BLAS a patch's log-joints and estimate — and so a pixel — could change in the last bits
with the tiling. Training keeps BLAS (2–6× faster here): its blocks are fixed by global patch index.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, error_model="numpy")
def _accumulate_rows(A, B, out):
    """out[i, j] = (…((0 + A[i, 0] B[0, j]) + A[i, 1] B[1, j]) + …), over k in increasing order (the loop over j
    vectorises; every element's sum is the same whatever the shapes)."""
    for i in range(A.shape[0]):
        for j in range(B.shape[1]):
            out[i, j] = 0.0
        for k in range(A.shape[1]):
            a = A[i, k]
            for j in range(B.shape[1]):
                out[i, j] += a * B[k, j]


def row_product(A: np.ndarray, B: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A B for A (n, m) and B (m, p) in float64, each element summed over k in increasing order, so that row i
    depends only on A[i] and B (into ``out`` if given: a C-contiguous (n, p) float64 array or row slice of
    one). Releases the GIL."""
    A = np.ascontiguousarray(A, dtype=np.float64)
    B = np.ascontiguousarray(B, dtype=np.float64)
    if out is None:
        out = np.empty((A.shape[0], B.shape[1]))
    _accumulate_rows(A, B, out)
    return out
