"""The simulated gene-regulatory network: modules of transcription factors driving target genes.

Genes are laid out internally in topological order (module TFs first, then targets, then unregulated
housekeeping genes) so every regulator precedes its targets; public gene names are assigned by a random
permutation so that the name says nothing about a gene's role.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

# Share of genes nobody regulates (housekeeping), and of TFs among module genes.
HOUSEKEEPING_FRACTION = 0.15
TF_FRACTION = 0.07
ACTIVATING_FRACTION = 0.75
CROSS_MODULE_PROB = 0.12
COOPERATIVE_PROB = 0.2


@dataclass
class GeneNetwork:
    """A sparse DAG with Hill-type regulation; all arrays are indexed by internal gene order."""

    n_genes: int
    module: np.ndarray  # int, -1 for housekeeping genes
    is_tf: np.ndarray  # bool
    is_master: np.ndarray  # bool, TFs without regulators, driven by cell-type levels
    depth: np.ndarray  # int, 0 for masters and unregulated genes
    scale: np.ndarray  # float, expression scale of each gene
    basal: np.ndarray  # float, regulation-independent share of production
    hill_n: np.ndarray  # float, Hill coefficient of each gene acting as a regulator
    edge_src: np.ndarray  # int
    edge_dst: np.ndarray  # int
    edge_weight: np.ndarray  # float, signed (negative = repression)
    coop_a: np.ndarray  # int, cooperative (AND) regulation: term w * f(a) * f(b) on target
    coop_b: np.ndarray
    coop_dst: np.ndarray
    coop_weight: np.ndarray
    master_levels: np.ndarray  # (n_cell_types, n_genes), used only on masters
    names: np.ndarray  # public gene symbol of each internal gene
    # Half-saturation constants, set by calibration on control states (mean control expression).
    hill_k: np.ndarray | None = field(default=None)

    @property
    def tfs(self) -> np.ndarray:
        return np.flatnonzero(self.is_tf)

    def signed_weights(self) -> sp.csc_matrix:
        """Regulator × target matrix of signed edge weights (CSC, sliced by target columns)."""
        return sp.csc_matrix(
            (self.edge_weight, (self.edge_src, self.edge_dst)), shape=(self.n_genes, self.n_genes)
        )

    def targets_of(self, gene: int) -> tuple[np.ndarray, np.ndarray]:
        """Direct targets of an internal gene index and the sign of each edge."""
        sel = self.edge_src == gene
        return self.edge_dst[sel], np.sign(self.edge_weight[sel])


def gene_symbols(n_genes: int) -> list[str]:
    width = max(4, len(str(n_genes)))
    return [f"G{i:0{width}d}" for i in range(1, n_genes + 1)]


def build_network(rng: np.random.Generator, n_genes: int, n_cell_types: int) -> GeneNetwork:
    """Random modular GRN: each module has a few master regulators, layered TFs and many targets."""
    if n_genes < 50:
        raise ValueError(f"n_genes={n_genes}: the simulator needs at least 50 genes")
    n_housekeeping = int(round(HOUSEKEEPING_FRACTION * n_genes))
    n_module_genes = n_genes - n_housekeeping
    n_modules = int(np.clip(n_module_genes // 300, 3, 12))
    sizes = _split_sizes(rng, n_module_genes, n_modules)
    n_tfs = [max(4, int(round(TF_FRACTION * s))) for s in sizes]
    n_targets = [s - t for s, t in zip(sizes, n_tfs)]

    # Internal order: TFs of every module, then targets of every module, then housekeeping.
    tf_module = np.concatenate([np.full(t, m) for m, t in enumerate(n_tfs)])
    target_module = np.concatenate([np.full(t, m) for m, t in enumerate(n_targets)])
    n_tf_total = len(tf_module)
    module = np.concatenate([tf_module, target_module, np.full(n_housekeeping, -1)])
    is_tf = np.zeros(n_genes, bool)
    is_tf[:n_tf_total] = True
    is_master = np.zeros(n_genes, bool)

    src: list[int] = []
    dst: list[int] = []
    tf_ids_by_module = [np.flatnonzero(tf_module == m) for m in range(n_modules)]
    for m, ids in enumerate(tf_ids_by_module):
        n_masters = max(1, len(ids) // 8)
        is_master[ids[:n_masters]] = True
        for k, tf in enumerate(ids[n_masters:], start=n_masters):
            for p in rng.choice(ids[:k], size=min(k, rng.integers(1, 3)), replace=False):
                src.append(int(p))
                dst.append(int(tf))
            earlier_foreign = np.arange(tf_module.size)[: int(ids[0])]
            if earlier_foreign.size and rng.random() < CROSS_MODULE_PROB:
                src.append(int(rng.choice(earlier_foreign)))
                dst.append(int(tf))

    coop: list[tuple[int, int, int]] = []
    for j in range(n_tf_total, n_tf_total + len(target_module)):
        m = module[j]
        ids = tf_ids_by_module[m]
        n_par = min(len(ids), int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])))
        parents = [int(p) for p in rng.choice(ids, size=n_par, replace=False)]
        if rng.random() < CROSS_MODULE_PROB:
            foreign = np.flatnonzero((tf_module != m))
            parents.append(int(rng.choice(foreign)))
        if len(parents) >= 2 and rng.random() < COOPERATIVE_PROB:
            coop.append((parents[0], parents[1], j))
            parents = parents[2:]
        src.extend(parents)
        dst.extend([j] * len(parents))

    edge_src = np.asarray(src, dtype=np.int64)
    edge_dst = np.asarray(dst, dtype=np.int64)
    sign = np.where(rng.random(edge_src.size) < ACTIVATING_FRACTION, 1.0, -1.0)
    magnitude = rng.uniform(0.5, 1.5, edge_src.size)
    coop_arr = np.asarray(coop, dtype=np.int64).reshape(-1, 3)
    coop_mag = rng.uniform(1.0, 2.0, len(coop_arr))

    # Normalise each gene's regulatory weights so that regulation explains (1 - basal) of production.
    basal = rng.uniform(0.05, 0.25, n_genes)
    total = np.zeros(n_genes)
    np.add.at(total, edge_dst, magnitude)
    np.add.at(total, coop_arr[:, 2], coop_mag)
    regulated = total > 0
    basal[~regulated] = 1.0
    norm = np.where(regulated, (1.0 - basal) / np.where(regulated, total, 1.0), 0.0)
    edge_weight = sign * magnitude * norm[edge_dst]
    coop_weight = coop_mag * norm[coop_arr[:, 2]]

    depth = np.zeros(n_genes, dtype=np.int64)
    order = np.argsort(edge_dst, kind="stable")
    for s, d in zip(edge_src[order], edge_dst[order]):  # sources precede targets internally
        depth[d] = max(depth[d], depth[s] + 1)
    for a, b, d in coop_arr:
        depth[d] = max(depth[d], depth[a] + 1, depth[b] + 1)

    scale = np.exp(rng.normal(0.0, 1.1, n_genes))
    scale[is_tf] *= 0.6
    hill_n = rng.uniform(1.5, 3.0, n_genes)

    # Each cell type runs one or two identity modules high; other masters vary moderately.
    master_levels = np.exp(rng.normal(0.0, 0.35, (n_cell_types, n_genes)))
    for c in range(n_cell_types):
        for m in {c % n_modules, (c + n_cell_types) % n_modules}:
            master_levels[c, tf_ids_by_module[m][is_master[tf_ids_by_module[m]]]] *= 3.0

    names = np.asarray(gene_symbols(n_genes), dtype=object)[rng.permutation(n_genes)]
    return GeneNetwork(
        n_genes=n_genes,
        module=module,
        is_tf=is_tf,
        is_master=is_master,
        depth=depth,
        scale=scale,
        basal=basal,
        hill_n=hill_n,
        edge_src=edge_src,
        edge_dst=edge_dst,
        edge_weight=edge_weight,
        coop_a=coop_arr[:, 0],
        coop_b=coop_arr[:, 1],
        coop_dst=coop_arr[:, 2],
        coop_weight=coop_weight,
        master_levels=master_levels,
        names=names,
    )


def _split_sizes(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    shares = rng.dirichlet(np.full(parts, 8.0))
    sizes = np.maximum(20, np.floor(shares * total)).astype(int)
    sizes[-1] = total - sizes[:-1].sum()
    return [int(s) for s in sizes]
