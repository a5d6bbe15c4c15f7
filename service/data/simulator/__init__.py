"""Single-cell perturbation simulator with a known ground truth.

`simulate(kind, seed, n_cells, n_genes)` builds a modular gene-regulatory network (Hill regulation on a
sparse DAG with master regulators whose levels differ by cell type), applies perturbations as
production multipliers, propagates them to steady state layer by layer, and samples negative-binomial
counts. The noise-free Δ of every condition and the network sit in `uns["simulation"]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ..conditions import condition_keys
from ..errors import DataError
from ..partwrite import PartWriter
from . import counts, readouts
from .dynamics import calibrate, steady_state
from .network import GeneNetwork, build_network
from .perturbations import CONTROL, CYTOKINES, Design, combos, cytokines, drugs, knockouts, stimulations

KINDS = ("knockout", "combo", "drug", "cytokine", "multiome", "stimulation")
CELL_TYPES = ("T_cell", "B_cell", "monocyte", "NK_cell", "dendritic", "fibroblast", "epithelial", "endothelial")
DEFAULT_CELL_TYPES = {"stimulation": 8}
ESCAPE_FRACTION = 0.1  # perturbed cells whose guide did not work (genetic kinds)

__all__ = ["KINDS", "SimulationError", "simulate", "simulate_to_file"]


class SimulationError(DataError):
    """Simulation parameters that cannot produce a dataset."""


def simulate(
    kind: str,
    seed: int,
    n_cells: int = 5000,
    n_genes: int = 1000,
    *,
    n_perturbations: int | None = None,
    n_cell_types: int | None = None,
    n_batches: int = 2,
) -> AnnData:
    """Simulate a perturbation dataset of raw counts; deterministic for a given seed and arguments
    (`simulate_to_file` writes the same dataset to disk a chunk of cells at a time).

    kind: `knockout` (CRISPRi-like knockdowns, mostly of regulators), `combo` (singles and `A+B`
    doubles), `drug` (compounds at 4 doses, obs `dose`), `cytokine` (responses that depend on the
    cell type), `multiome` (knockdowns read out as RNA + surface proteins + ATAC peaks), `stimulation`
    (stimuli across many cell types whose responses follow from each type's control state, for
    unseen-cell-type tasks). n_cell_types: 8 for `stimulation`, 3 for the other kinds by default.
    obs: `perturbation` (`control` for controls), `dose` and `targets` (drug only: the compound's annotated
    target genes, `;`-separated, empty for controls), `cell_type`, `batch`.
    var: gene symbols `G0001`…; `feature_types` (10x convention). X: float32 CSR of integer counts.
    uns["simulation"]: `conditions` (condition keys with perturbation/dose/context), `delta`
    (noise-free log1p-cp10k Δ vs the control of the same cell type; rows = conditions, columns = the
    Gene Expression features), `network` (edges and TF groups), `genes` (module, TF, master flags) and
    what was done per kind (`knockdown`, `cooperative_pairs`, `drug_targets`, `cytokine_receptors`,
    `protein_genes`/`peak_genes` for multiome).
    """
    obs, var, uns, chunks = _simulation(kind, seed, n_cells, n_genes, n_perturbations, n_cell_types, n_batches)
    parts = list(chunks)
    x = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
    adata = AnnData(X=x, obs=obs, var=var)
    adata.uns["simulation"] = uns
    return adata


def simulate_to_file(
    path: str | Path,
    kind: str,
    seed: int,
    n_cells: int = 5000,
    n_genes: int = 1000,
    *,
    n_perturbations: int | None = None,
    n_cell_types: int | None = None,
    n_batches: int = 2,
    compression: str | None = "gzip",
) -> AnnData:
    """`simulate` written to `path` as the counts are sampled, `CHUNK_CELLS` cells at a time (multiome: its
    three readouts are sampled whole, then written), so memory stays near one chunk plus the annotations.
    Returns the dataset without X (obs, var, uns)."""
    obs, var, uns, chunks = _simulation(kind, seed, n_cells, n_genes, n_perturbations, n_cell_types, n_batches)
    writer = PartWriter(Path(path), obs, var, {"simulation": uns}, compression=compression)
    ok = False
    try:
        for chunk in chunks:
            writer.append(chunk)
        ok = True
    finally:
        writer.close(check=ok)
    return AnnData(obs=obs, var=var, uns={"simulation": uns})


def _simulation(
    kind: str,
    seed: int,
    n_cells: int,
    n_genes: int,
    n_perturbations: int | None,
    n_cell_types: int | None,
    n_batches: int,
) -> tuple[pd.DataFrame, pd.DataFrame, dict, Iterator[sp.csr_matrix]]:
    """obs, var, uns["simulation"] and the counts as an iterator of CSR chunks (sampled as it is read)."""
    if n_cell_types is None:
        n_cell_types = DEFAULT_CELL_TYPES.get(kind, 3)
    _check(kind, n_cells, n_genes, n_cell_types, n_batches, n_perturbations)
    net_rng, design_rng, cell_rng, count_rng, readout_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    net = build_network(net_rng, n_genes, n_cell_types)
    control = calibrate(net)
    design = _design(kind, design_rng, net, control, n_cells, n_perturbations)
    n_cond, n_types, _ = design.multiplier.shape
    state_type = np.tile(np.arange(n_types), n_cond)
    expression = steady_state(net, state_type, design.multiplier.reshape(n_cond * n_types, -1))

    # Public gene order is by symbol; the internal order is topological.
    order = np.argsort(net.names)
    expression = expression[:, order]
    gene_names = net.names[order].astype(str)
    relative = expression / expression.sum(axis=1, keepdims=True)

    state = _allocate_cells(cell_rng, n_cells, n_cond, n_types)
    condition_of_cell, type_of_cell = np.divmod(state, n_types)
    if design.escapes:
        escaped = (condition_of_cell > 0) & (cell_rng.random(n_cells) < ESCAPE_FRACTION)
        state = np.where(escaped, type_of_cell, state)  # control state of the same cell type

    noise = counts.make_cell_noise(cell_rng, n_cells, n_genes, n_batches, median_library=1.5 * n_genes)
    feature_types = ["Gene Expression"] * n_genes
    var_names = list(gene_names)
    # Counts are sampled lazily, after the annotations: count_rng draws in the same order either way.
    chunks: Iterator[sp.csr_matrix] = counts.count_chunks(count_rng, relative, state, noise)
    if kind == "multiome":
        prot = readouts.proteins(readout_rng, expression, gene_names)
        peak = readouts.peaks(readout_rng, expression)
        adt_library = 3000.0 * noise.library / np.median(noise.library)
        atac_depth = 0.8 * noise.library / np.median(noise.library)

        def multiome() -> Iterator[sp.csr_matrix]:
            rna = counts.sample_counts(count_rng, relative, state, noise)
            protein = readouts.sample_protein_counts(count_rng, prot.expected, state, adt_library)
            yield sp.hstack([rna, protein, readouts.sample_peak_counts(count_rng, peak.expected, state, atac_depth)],
                            format="csr")

        chunks = multiome()
        feature_types += ["Antibody Capture"] * len(prot.names) + ["Peaks"] * len(peak.names)
        var_names += prot.names + peak.names

    cell_types = np.asarray(CELL_TYPES[:n_types])
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(np.asarray(design.perturbation)[condition_of_cell]),
            "cell_type": pd.Categorical(cell_types[type_of_cell]),
            "batch": pd.Categorical(np.char.add("batch", (noise.batch + 1).astype(str))),
        },
        index=[f"cell{i:06d}" for i in range(n_cells)],
    )
    if kind == "drug":
        obs.insert(1, "dose", design.dose[condition_of_cell])
        obs.insert(2, "targets", pd.Categorical(np.asarray(_target_labels(design))[condition_of_cell]))
    var = pd.DataFrame({"feature_types": pd.Categorical(feature_types)}, index=var_names)
    uns = _truth(kind, seed, net, order, design, expression, cell_types)
    if kind == "multiome":
        uns["protein_genes"] = gene_names[prot.linked_gene]
        uns["peak_genes"] = gene_names[peak.linked_gene]
    return obs, var, uns, chunks


def _target_labels(design: Design) -> list[str]:
    """Each condition's annotated target genes as a screen lists them (`G0012;G0345`, empty for the
    control): an input describing the compound, not its response."""
    table = design.truth["drug_targets"]
    by_drug: dict[str, list[str]] = {}
    for drug, gene in zip(table["drug"], table["gene"], strict=True):
        by_drug.setdefault(str(drug), []).append(str(gene))
    return [";".join(by_drug.get(p, [])) for p in design.perturbation]


def _check(
    kind: str, n_cells: int, n_genes: int, n_types: int, n_batches: int, n_perts: int | None
) -> None:
    if kind not in KINDS:
        raise SimulationError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    if n_genes < 50:
        raise SimulationError(f"n_genes={n_genes}: at least 50 genes are needed for a network")
    if not 1 <= n_types <= len(CELL_TYPES):
        raise SimulationError(f"n_cell_types={n_types}: expected 1..{len(CELL_TYPES)}")
    if n_batches < 1:
        raise SimulationError(f"n_batches={n_batches}: expected at least 1")
    if n_cells < 100:
        raise SimulationError(f"n_cells={n_cells}: at least 100 cells are needed")
    if n_perts is not None and n_perts < 1:
        raise SimulationError(f"n_perturbations={n_perts}: expected at least 1")
    if kind in ("cytokine", "stimulation") and n_perts is not None and n_perts > len(CYTOKINES):
        raise SimulationError(f"n_perturbations={n_perts}: at most {len(CYTOKINES)} cytokines are simulated")


def _design(
    kind: str,
    rng: np.random.Generator,
    net: GeneNetwork,
    control: np.ndarray,
    n_cells: int,
    n_perts: int | None,
) -> Design:
    n_types = control.shape[0]
    max_genetic = int(len(net.tfs) / 0.85)
    if kind in ("knockout", "multiome"):
        n = n_perts or int(np.clip(n_cells // (150 * n_types), 6, 400))
        return knockouts(rng, net, n_types, min(n, max_genetic))
    if kind == "combo":
        n = n_perts or int(np.clip(n_cells // (80 * n_types), 6, 300))
        return combos(rng, net, n_types, n)
    if kind == "drug":
        n = n_perts or int(np.clip(n_cells // (400 * n_types), 3, 40))
        return drugs(rng, net, n_types, n)
    if kind == "stimulation":
        return stimulations(rng, net, control, n_perts or int(np.clip(n_cells // (150 * n_types), 3, 12)))
    n = n_perts or int(np.clip(n_cells // (300 * n_types), 3, 12))
    return cytokines(rng, net, control, n)


def _allocate_cells(rng: np.random.Generator, n_cells: int, n_cond: int, n_types: int) -> np.ndarray:
    """State index (condition × n_types + cell type) of every cell, in random order."""
    type_share = rng.dirichlet(np.full(n_types, 8.0))
    cond_share = np.exp(rng.normal(0.0, 0.2, n_cond))
    cond_share[0] = 0.0
    # Controls: at least a tenth (3/n_cond with few conditions), and never all but one condition's share
    # (with one or two perturbations 3/n_cond left nothing, or less than nothing, to perturb).
    control_share = min(max(0.1, 3.0 / n_cond), 1.0 - 1.0 / n_cond)
    cond_share *= (1.0 - control_share) / cond_share.sum()
    cond_share[0] = control_share
    grid = np.outer(cond_share, type_share).ravel()
    n_per_state = rng.multinomial(n_cells, grid / grid.sum())
    return rng.permutation(np.repeat(np.arange(grid.size), n_per_state))


def _truth(
    kind: str,
    seed: int,
    net: GeneNetwork,
    order: np.ndarray,
    design: Design,
    expression: np.ndarray,
    cell_types: np.ndarray,
) -> dict:
    """h5ad-writable ground truth: network, conditions and noise-free Δ (log1p cp10k vs control)."""
    n_cond, n_types, _ = design.multiplier.shape
    lognorm = np.log1p(1e4 * expression / expression.sum(axis=1, keepdims=True))
    lognorm = lognorm.reshape(n_cond, n_types, -1)
    delta = (lognorm[1:] - lognorm[:1]).reshape((n_cond - 1) * n_types, -1).astype(np.float32)
    pert = np.repeat(np.asarray(design.perturbation[1:], dtype=str), n_types)
    dose = np.repeat(design.dose[1:], n_types)
    context = np.tile(cell_types, n_cond - 1).astype(str)
    names = net.names.astype(str)
    return {
        "version": 1,
        "kind": kind,
        "seed": int(seed),
        "control_label": CONTROL,
        "cell_types": cell_types.astype(str),
        "conditions": {
            "condition": condition_keys(pert, dose, context).astype(str),
            "perturbation": pert,
            "dose": dose,
            "context": context,
        },
        "delta": delta,
        "delta_definition": (
            "log1p(1e4*x/sum(x)) of the noise-free steady state minus the same for the control of the "
            "same cell type; columns are the Gene Expression features in var order"
        ),
        "network": {
            "source": names[net.edge_src],
            "target": names[net.edge_dst],
            "weight": net.edge_weight,
            # Groups: group_target[g] gets group_weight[g] × the geometric mean of its members' Hill
            # activations (complex) or × (1 - Π(1 - activation)) when group_redundant[g] (either suffices).
            "group_member": names[net.group_member],
            "group_of_member": net.group_of_member,
            "group_target": names[net.group_dst],
            "group_weight": net.group_weight,
            "group_redundant": net.group_redundant,
        },
        "genes": {
            "name": names[order],
            "module": net.module[order],
            "is_tf": net.is_tf[order],
            "is_master": net.is_master[order],
        },
        **design.truth,
    }
