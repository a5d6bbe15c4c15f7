"""Multiome readouts derived from the simulated RNA state: CITE-like surface proteins and ATAC-like peaks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .counts import CHUNK_CELLS


@dataclass
class Readout:
    names: list[str]
    linked_gene: np.ndarray  # internal gene index each feature reads
    expected: np.ndarray  # (states, features) noise-free level per state


def proteins(rng: np.random.Generator, expression: np.ndarray, gene_names: np.ndarray) -> Readout:
    """Protein = background + saturating function of its gene's mRNA (antibody capture saturates)."""
    n_genes = expression.shape[1]
    n = int(np.clip(n_genes // 20, 5, 200))
    genes = rng.choice(n_genes, n, replace=False)
    half = np.median(expression[:, genes], axis=0)
    background = rng.uniform(0.05, 0.2, n)
    maximum = np.exp(rng.normal(0.0, 0.5, n))
    x = expression[:, genes]
    level = maximum * (background + x / (half + x))
    return Readout([f"{gene_names[g]}-TotalSeq" for g in genes], genes, level)


def peaks(rng: np.random.Generator, expression: np.ndarray) -> Readout:
    """Peak accessibility opens with its gene's activity (a sigmoid of expression), from a closed floor."""
    n_genes = expression.shape[1]
    n = int(np.clip(n_genes // 2, 10, 20000))
    genes = rng.choice(n_genes, n, replace=True)
    k = np.median(expression[:, genes], axis=0)
    floor = rng.uniform(0.02, 0.15, n)
    ratio = (expression[:, genes] / k) ** 2
    access = floor + (1.0 - floor) * ratio / (1.0 + ratio)
    chrom = rng.integers(1, 23, n)
    start = rng.integers(10_000, 200_000_000, n)
    names = [f"chr{c}:{s}-{s + 500}" for c, s in zip(chrom, start, strict=True)]
    return Readout(names, genes, access)


def sample_protein_counts(
    rng: np.random.Generator, expected: np.ndarray, state: np.ndarray, library: np.ndarray
) -> sp.csr_matrix:
    """ADT counts: NB around level × library, the library being the expected total over all proteins."""
    theta = 8.0
    mu = expected[state] / expected.mean() * (library / expected.shape[1])[:, None]
    lam = rng.standard_gamma(theta, size=mu.shape) * mu / theta
    return sp.csr_matrix(rng.poisson(lam).astype(np.float32))


def sample_peak_counts(
    rng: np.random.Generator, access: np.ndarray, state: np.ndarray, depth: np.ndarray
) -> sp.csr_matrix:
    """Fragment counts per peak: Poisson at depth × accessibility, built chunk by chunk."""
    blocks = []
    for start in range(0, len(state), CHUNK_CELLS):
        cells = slice(start, start + CHUNK_CELLS)
        lam = access[state[cells]] * depth[cells, None]
        blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    return sp.vstack(blocks, format="csr")
