"""Cell-level sampling: negative-binomial UMI counts with library size, batch, a cell-cycle-like
programme and dropout, generated chunk by chunk straight into CSR so memory stays near the output size."""

from __future__ import annotations

from dataclasses import dataclass

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


def sample_counts(
    rng: np.random.Generator, relative: np.ndarray, state: np.ndarray, noise: CellNoise
) -> sp.csr_matrix:
    """UMI counts (cells × genes, float32 CSR) for cells whose noise-free profile is relative[state]."""
    n_cells = len(state)
    n_genes = relative.shape[1]
    theta = noise.inverse_dispersion.astype(np.float32)
    relative = relative.astype(np.float32)
    batch_factor = noise.batch_factor.astype(np.float32)
    indptr = [np.zeros(1, dtype=np.int64)]
    indices: list[np.ndarray] = []
    data: list[np.ndarray] = []
    nnz = 0
    for start in range(0, n_cells, CHUNK_CELLS):
        cells = slice(start, min(start + CHUNK_CELLS, n_cells))
        mu = relative[state[cells]] * batch_factor[noise.batch[cells]]
        mu *= noise.library[cells, None].astype(np.float32)
        mu[:, noise.programme_genes] *= np.exp(noise.programme_score[cells, None]).astype(np.float32)
        # Gamma–Poisson mixture = negative binomial with mean mu and inverse dispersion theta.
        lam = rng.standard_gamma(theta, size=mu.shape, dtype=np.float32)
        lam *= mu / theta
        counts = rng.poisson(lam)
        rows, cols = np.nonzero(counts)
        values = counts[rows, cols]
        keep = rng.random(len(values), dtype=np.float32) >= noise.dropout / (1.0 + mu[rows, cols])
        rows, cols, values = rows[keep], cols[keep], values[keep]
        row_nnz = np.bincount(rows, minlength=mu.shape[0])
        indptr.append(nnz + np.cumsum(row_nnz))
        nnz += len(values)
        indices.append(cols.astype(np.int32))
        data.append(values.astype(np.float32))
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
        shape=(n_cells, n_genes),
    )
