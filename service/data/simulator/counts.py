"""Cell-level sampling: negative-binomial UMI counts with library size, batch, a cell-cycle-like
programme and dropout, generated chunk by chunk straight into CSR so memory stays near the output size."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp

CHUNK_CELLS = 2048


@dataclass
class CellNoise:
    """Per-gene and per-cell nuisance factors shared by every modality of a cell."""

    library: np.ndarray  # (cells,) expected total UMIs
    batch: np.ndarray  # (cells,) batch index
    batch_factor: np.ndarray  # (batches, genes) multiplicative batch effect
    inverse_dispersion: np.ndarray  # (genes,) NB theta
    programme_genes: np.ndarray  # genes modulated by a cell-level programme (cell-cycle-like)
    programme_score: np.ndarray  # (cells,) log-fold of that programme
    dropout: float  # extra zero probability at mean 0 (decays as d / (1 + mu))


def make_cell_noise(
    rng: np.random.Generator, n_cells: int, n_genes: int, n_batches: int, median_library: float
) -> CellNoise:
    batch = rng.integers(0, n_batches, n_cells)
    batch_shift = rng.normal(0.0, 0.15, n_batches)
    library = median_library * np.exp(rng.normal(0.0, 0.4, n_cells) + batch_shift[batch])
    return CellNoise(
        library=library,
        batch=batch,
        batch_factor=np.exp(rng.normal(0.0, 0.15, (n_batches, n_genes))),
        inverse_dispersion=np.exp(rng.normal(np.log(3.0), 0.6, n_genes)),
        programme_genes=rng.choice(n_genes, size=max(5, n_genes // 40), replace=False),
        programme_score=rng.normal(0.0, 0.5, n_cells),
        dropout=0.15,
    )


def count_chunks(
    rng: np.random.Generator, relative: np.ndarray, state: np.ndarray, noise: CellNoise
) -> Iterator[sp.csr_matrix]:
    """UMI counts (float32 CSR) for cells whose noise-free profile is relative[state], `CHUNK_CELLS`
    cells at a time, so a caller can write them out without holding every cell."""
    n_cells = len(state)
    n_genes = relative.shape[1]
    theta = noise.inverse_dispersion.astype(np.float32)
    relative = relative.astype(np.float32)
    batch_factor = noise.batch_factor.astype(np.float32)
    for start in range(0, n_cells, CHUNK_CELLS):
        cells = slice(start, min(start + CHUNK_CELLS, n_cells))
        mu = relative[state[cells]] * batch_factor[noise.batch[cells]]
        mu *= noise.library[cells, None].astype(np.float32)
        mu[:, noise.programme_genes] *= np.exp(noise.programme_score[cells, None]).astype(np.float32)
        u = rng.random(mu.shape, dtype=np.float32)
        u_drop = rng.random(mu.shape, dtype=np.float32)
        cols = np.empty(mu.size, dtype=np.int32)
        values = np.empty(mu.size, dtype=np.float32)
        row_nnz = np.empty(mu.shape[0], dtype=np.int64)
        n = _sample_rows(mu, theta, u, u_drop, np.float32(noise.dropout), cols, values, row_nnz)
        indptr = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(row_nnz)])
        yield sp.csr_matrix((values[:n].copy(), cols[:n].copy(), indptr), shape=(mu.shape[0], n_genes))


def sample_counts(
    rng: np.random.Generator, relative: np.ndarray, state: np.ndarray, noise: CellNoise
) -> sp.csr_matrix:
    """UMI counts (cells × genes, float32 CSR) for cells whose noise-free profile is relative[state]."""
    chunks = list(count_chunks(rng, relative, state, noise))
    if not chunks:
        return sp.csr_matrix((0, relative.shape[1]), dtype=np.float32)
    return sp.vstack(chunks, format="csr")


@numba.njit(cache=True, nogil=True, parallel=True)
def _sample_rows(mu, theta, u, u_drop, dropout, indices, values, row_nnz):
    """NB(mu, theta) by CDF inversion, with dropout, written as CSR pieces; returns the non-zero count.

    Inversion with one uniform per entry settles most entries (the zeros) with a single comparison;
    numba keeps that per-entry loop at a few nanoseconds, where numpy's Gamma–Poisson costs ~100 ns.
    Rows run in parallel (numba threads), each into its own stretch of `indices`/`values`, then the
    stretches are packed: the uniforms are drawn beforehand, so the counts do not depend on the threads.
    """
    n_genes = mu.shape[1]
    for i in numba.prange(mu.shape[0]):
        nnz = i * n_genes
        start = nnz
        for j in range(n_genes):
            m = np.float64(mu[i, j])
            if m <= 0.0:
                continue
            t = np.float64(theta[j])
            p = np.exp(t * np.log(t / (t + m)))
            x = u[i, j]
            if x <= p:
                continue
            q = m / (t + m)
            cdf = p
            k = 0
            limit = 20.0 * m + 1000.0
            while x > cdf and p > 1e-300 and k < limit:
                p *= (k + t) / (k + 1) * q
                k += 1
                cdf += p
            if u_drop[i, j] < dropout / (1.0 + m):
                continue
            indices[nnz] = j
            values[nnz] = k
            nnz += 1
        row_nnz[i] = nnz - start
    return _pack(indices, values, row_nnz, n_genes)


@numba.njit(cache=True, nogil=True)
def _pack(indices, values, row_nnz, width):
    """Move row i's entries from offset i * width to just after row i - 1's (never past its own start)."""
    nnz = 0
    for i in range(len(row_nnz)):
        start = i * width
        for k in range(row_nnz[i]):
            indices[nnz + k] = indices[start + k]
            values[nnz + k] = values[start + k]
        nnz += row_nnz[i]
    return nnz
