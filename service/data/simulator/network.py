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
# Few, large modules: a genome's programmes that ~10 principal components can still tell apart.
GENES_PER_MODULE = 400
MAX_MODULES = 8
TF_CP10K = 8.0
# How much cell types differ: spread of master levels, and the boost of each type's identity modules.
MASTER_SPREAD = 0.35
IDENTITY_BOOST = 1.7
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
    # Regulation by groups of TFs. A complex (AND) adds w_g × the geometric mean of its members'
    # activations; a redundant group (OR, e.g. paralogs) adds w_g × (1 - Π(1 - f_i)), so either member
    # suffices and only losing both hurts: a genuine, non-additive genetic interaction.
    group_member: np.ndarray  # int, member gene of each membership row
    group_of_member: np.ndarray  # int, group of each membership row
    group_dst: np.ndarray  # int, target of each group
    group_weight: np.ndarray
    group_redundant: np.ndarray  # bool, OR group (else complex)
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

    def group_matrix(self) -> sp.csc_matrix:
        """Gene × group membership matrix: 1/|group| for complexes (log-activations @ it = log of the
        geometric mean), 1 for redundant groups (log-inactivations @ it = log Π(1 - f_i))."""
        sizes = np.bincount(self.group_of_member, minlength=len(self.group_dst))
        value = np.where(self.group_redundant[self.group_of_member], 1.0, 1.0 / sizes[self.group_of_member])
        return sp.csc_matrix(
            (value, (self.group_member, self.group_of_member)), shape=(self.n_genes, len(self.group_dst))
        )

    def ancestors(self, gene: int) -> set[int]:
        """Every regulator upstream of an internal gene index (through edges and groups)."""
        parents_of = np.concatenate([self.edge_src, self.group_member])
        child_of = np.concatenate([self.edge_dst, self.group_dst[self.group_of_member]])
        seen: set[int] = set()
        frontier = [gene]
        while frontier:
            new = set(parents_of[np.isin(child_of, frontier)].tolist()) - seen
            seen |= new
            frontier = list(new)
        return seen

    def targets_of(self, gene: int) -> tuple[np.ndarray, np.ndarray]:
        """Direct targets of an internal gene index and the sign of each (group memberships activate)."""
        sel = self.edge_src == gene
        groups = self.group_of_member[self.group_member == gene]
        targets = np.concatenate([self.edge_dst[sel], self.group_dst[groups]])
        return targets, np.concatenate([np.sign(self.edge_weight[sel]), np.ones(len(groups))])


def gene_symbols(n_genes: int) -> list[str]:
    width = max(4, len(str(n_genes)))
    return [f"G{i:0{width}d}" for i in range(1, n_genes + 1)]


def build_network(rng: np.random.Generator, n_genes: int, n_cell_types: int) -> GeneNetwork:
    """Random modular GRN: per module a few master regulators, a deep TF hierarchy, hub TFs that need
    several module TFs at once (complexes), and many targets that mostly hang off those hubs."""
    n_housekeeping = int(round(HOUSEKEEPING_FRACTION * n_genes))
    n_module_genes = n_genes - n_housekeeping
    n_modules = int(np.clip(n_module_genes // GENES_PER_MODULE, max(1, min(3, n_module_genes // 40)), MAX_MODULES))
    sizes = _split_sizes(rng, n_module_genes, n_modules)
    n_tfs = [max(5, int(round(TF_FRACTION * s))) for s in sizes]
    n_targets = [s - t for s, t in zip(sizes, n_tfs, strict=True)]

    # Internal order: TFs of every module, then targets of every module, then housekeeping.
    tf_module = np.concatenate([np.full(t, m) for m, t in enumerate(n_tfs)])
    target_module = np.concatenate([np.full(t, m) for m, t in enumerate(n_targets)])
    n_tf_total = len(tf_module)
    module = np.concatenate([tf_module, target_module, np.full(n_housekeeping, -1)])
    is_tf = np.zeros(n_genes, bool)
    is_tf[:n_tf_total] = True
    is_master = np.zeros(n_genes, bool)

    edges = _EdgeList()
    tf_ids_by_module = [np.flatnonzero(tf_module == m) for m in range(n_modules)]
    # Regulators differ in reach (scale-free out-degree): some are picked as parents far more often.
    reach = 1.0 + rng.pareto(1.5, n_tf_total)
    for ids in tf_ids_by_module:
        n_masters = max(1, len(ids) // 8)
        n_hubs = max(1, len(ids) // 8)
        first_hub = min(len(ids) - n_hubs, max(n_masters + 3, int(0.45 * len(ids))))
        hubs = ids[first_hub : first_hub + n_hubs]
        is_master[ids[:n_masters]] = True
        for k, tf in enumerate(ids[n_masters:], start=n_masters):
            if tf in hubs:
                # Hub: a complex of several module TFs (geometric mean of their activities), so that
                # knocking down any of them moves the whole module: a shared, module-wide programme.
                # Members come from the lower part of the hierarchy above it, so they also follow
                # upstream knockdowns: a member co-varies with the programme it drives.
                lower = ids[k // 3 : first_hub]
                size = min(len(lower), max(3, int(rng.uniform(0.4, 0.7) * len(lower))))
                members = rng.choice(lower, size=size, replace=False)
                edges.add_group(members, int(tf), rng.uniform(1.0, 2.0))
                reach[tf] = reach[ids].sum()  # hubs regulate about half of the module's targets
                continue
            # A dominant parent among the last few TFs makes the hierarchy deep, so that an
            # upstream knockdown cascades through much of its module; below the hubs it is often a
            # hub, so those TFs carry the module's programme too.
            if k > hubs[-1] and rng.random() < 0.5:
                main = int(rng.choice(hubs))
            else:
                main = int(ids[k - 1 - min(k - 1, int(rng.integers(0, 3)))])
            edges.add(main, int(tf), dominant=True)
            others = np.setdiff1d(ids[:k], [main])
            if others.size and rng.random() < 0.6:
                edges.add(int(rng.choice(others, p=reach[others] / reach[others].sum())), int(tf))
            earlier_foreign = np.arange(int(ids[0]))
            if earlier_foreign.size and rng.random() < CROSS_MODULE_PROB:
                edges.add(int(rng.choice(earlier_foreign)), int(tf))

    for j in range(n_tf_total, n_tf_total + len(target_module)):
        m = module[j]
        ids = tf_ids_by_module[m]
        n_par = min(len(ids), int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25])))
        parents = [int(p) for p in rng.choice(ids, size=n_par, replace=False, p=reach[ids] / reach[ids].sum())]
        if n_modules > 1 and rng.random() < CROSS_MODULE_PROB:
            parents.append(int(rng.choice(np.flatnonzero(tf_module != m))))
        if len(parents) >= 2 and rng.random() < COOPERATIVE_PROB:
            # Redundant pair (paralog-like): either TF suffices, losing both is synergistic.
            edges.add_group(np.asarray(parents[:2]), j, rng.uniform(1.0, 2.0), redundant=True)
            parents = parents[2:]
        for p in parents:
            edges.add(p, j)

    edge_src = np.asarray(edges.src, dtype=np.int64)
    edge_dst = np.asarray(edges.dst, dtype=np.int64)
    sign = np.where(rng.random(edge_src.size) < ACTIVATING_FRACTION, 1.0, -1.0)
    magnitude = np.exp(rng.normal(0.0, 1.0, edge_src.size))  # a dominant parent is common
    magnitude[edges.dominant] *= 3.0
    sign[edges.dominant] = 1.0
    group_dst = np.asarray(edges.group_dst, dtype=np.int64)
    group_mag = np.asarray(edges.group_mag, dtype=float)

    # Normalise each gene's regulatory weights so that regulation explains (1 - basal) of production.
    basal = rng.uniform(0.02, 0.15, n_genes)
    total = np.zeros(n_genes)
    np.add.at(total, edge_dst, magnitude)
    np.add.at(total, group_dst, group_mag)
    regulated = total > 0
    basal[~regulated] = 1.0
    norm = np.where(regulated, (1.0 - basal) / np.where(regulated, total, 1.0), 0.0)
    edge_weight = sign * magnitude * norm[edge_dst]
    group_weight = group_mag * norm[group_dst]
    group_member = np.asarray(edges.group_member, dtype=np.int64)
    group_of_member = np.asarray(edges.group_of_member, dtype=np.int64)

    depth = np.zeros(n_genes, dtype=np.int64)
    incoming = sorted(
        [(d, s) for s, d in zip(edge_src, edge_dst, strict=True)]
        + [(group_dst[g], s) for s, g in zip(group_member, group_of_member, strict=True)]
    )
    for d, s in incoming:  # sources precede targets internally, so one ordered pass suffices
        depth[d] = max(depth[d], depth[s] + 1)

    scale = np.exp(rng.normal(0.0, 1.5, n_genes))
    # Regulators are well expressed (as the perturbed genes of most screens are), so their own
    # knockdown and their response to others are measurable in log-normalised counts whatever the
    # number of genes: their scale is set from a share of the library (TF_CP10K counts per 10k).
    tf_share = np.exp(rng.normal(np.log(TF_CP10K), 0.6, int(is_tf.sum()))) / 1e4
    scale[is_tf] = tf_share / (1.0 - tf_share.sum()) * scale[~is_tf].sum() * 2.0  # production ≈ 0.5
    hill_n = rng.uniform(2.0, 4.0, n_genes)

    # Each cell type runs one or two identity modules high; other masters vary moderately.
    master_levels = np.exp(rng.normal(0.0, MASTER_SPREAD, (n_cell_types, n_genes)))
    for c in range(n_cell_types):
        for m in {c % n_modules, (c + n_cell_types) % n_modules}:
            master_levels[c, tf_ids_by_module[m][is_master[tf_ids_by_module[m]]]] *= IDENTITY_BOOST

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
        group_member=group_member,
        group_of_member=group_of_member,
        group_dst=group_dst,
        group_weight=group_weight,
        group_redundant=np.asarray(edges.group_redundant, dtype=bool),
        master_levels=master_levels,
        names=names,
    )


@dataclass
class _EdgeList:
    src: list[int] = field(default_factory=list)
    dst: list[int] = field(default_factory=list)
    dominant: list[int] = field(default_factory=list)
    group_member: list[int] = field(default_factory=list)
    group_of_member: list[int] = field(default_factory=list)
    group_dst: list[int] = field(default_factory=list)
    group_mag: list[float] = field(default_factory=list)
    group_redundant: list[bool] = field(default_factory=list)

    def add(self, src: int, dst: int, dominant: bool = False) -> None:
        if dominant:
            self.dominant.append(len(self.src))
        self.src.append(src)
        self.dst.append(dst)

    def add_group(self, members: np.ndarray, dst: int, magnitude: float, redundant: bool = False) -> None:
        g = len(self.group_dst)
        self.group_member.extend(int(x) for x in members)
        self.group_of_member.extend([g] * len(members))
        self.group_dst.append(dst)
        self.group_mag.append(float(magnitude))
        self.group_redundant.append(redundant)


def _split_sizes(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    shares = rng.dirichlet(np.full(parts, 8.0))
    sizes = np.maximum(min(20, total // parts), np.floor(shares * total)).astype(int)
    sizes[-1] = total - sizes[:-1].sum()
    return [int(s) for s in sizes]
