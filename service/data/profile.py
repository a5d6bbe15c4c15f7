"""The data profile: everything an expert reasons over before choosing a split, metrics and a model.

`profile_dataset` makes one pass over the matrix in row chunks: library sizes, sparsity, and the
pseudobulk mean of every condition on log-normalized expression (one sparse product per chunk).
Effect sizes, target knock-down and signal-to-noise come from those means, so profiling a
50k x 5k dataset costs about as much as reading it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel

from .errors import preview
from .conditions import BATCH, COMBO_SEPARATOR, CONDITION, CONTEXT, DOSE, IS_CONTROL, PERTURBATION, combo_genes
from .chunks import row_chunks
from .load import DEFAULT_MIN_CELLS, POOLED, Dataset, load_dataset
from .preprocess import normalize_log1p

QUANTILES = {"min": 0.0, "q10": 0.1, "q25": 0.25, "median": 0.5, "q75": 0.75, "q90": 0.9, "max": 1.0}
SMALL_CONDITION_CELLS = 20  # below this a condition's pseudobulk and DE tests are noisy
DE_OVERLAP_MIN_CELLS = 30
HVG_ABOVE = 8_000  # beyond this many genes, most carry no perturbation signal: keep the variable ones
HVG_KEEP = 5_000  # GEARS' choice for Norman / Replogle
_LIST_LIMIT = 50


class CombosProfile(BaseModel):
    n_combos: int
    n_singles: int
    both_singles_present: int  # combos whose two genes are each also perturbed alone
    one_single_present: int
    no_single_present: int


class DoseProfile(BaseModel):
    n_drugs: int
    dose_levels: list[float]
    levels_per_drug_min: int
    levels_per_drug_max: int
    doses_per_drug: dict[str, list[float]]  # first 50 drugs


class ContextProfile(BaseModel):
    n_contexts: int
    cells: dict[str, int]
    control_cells: dict[str, int]
    perturbations: dict[str, int]  # distinct perturbations measured per context
    perturbations_in_all_contexts: int
    coverage: float  # filled share of the contexts x perturbations grid


class DataProfile(BaseModel):
    """What the agents (and `cellforge data profile`) see about a dataset."""

    source: str
    n_cells: int
    n_genes: int  # RNA features
    n_features: int  # all features (RNA + proteins + peaks + others)
    feature_types: dict[str, int]
    modalities: list[str]
    normalization: str  # "raw_counts" or "log_normalized"
    perturbation_kind: str
    perturbation_key: str
    control_labels: list[str]
    dose_key: str | None
    context_key: str | None
    batch_key: str | None
    backed: bool

    n_perturbations: int
    n_conditions: int
    n_control_cells: int
    cells_per_condition: dict[str, float]
    cells_per_condition_median: float
    cells_per_condition_min: float
    small_conditions: list[str]  # fewer than SMALL_CONDITION_CELLS cells (first 50)
    n_small_conditions: int

    sparsity: float  # share of zeros in X
    library_size: dict[str, float]  # total RNA counts per cell (of X as stored when log-normalized)
    genes_detected: dict[str, float]  # non-zero RNA features per cell

    n_contexts: int
    contexts: ContextProfile | None
    n_doses: int
    doses: DoseProfile | None
    n_combos: int
    combos: CombosProfile | None
    n_batches: int
    conditions_in_one_batch_fraction: float | None  # high = perturbation confounded with batch

    annotation_key: str | None = None  # obs column of per-perturbation target annotations (drugs, cytokines)
    annotated_perturbations_fraction: float | None = None  # perturbations with a non-empty annotation
    n_target_genes: int | None  # genetic: distinct genes targeted; annotated data: distinct annotated targets
    target_genes_measured_fraction: float | None
    targets_not_measured: list[str]  # first 50
    target_knockdown_fraction: float | None  # measured single targets lower than control in their own condition
    target_direction: str | None  # "down" (CRISPRi/KO), "up" (CRISPRa/overexpression) or "mixed"
    delta_norm: dict[str, float]  # L2 norm of pseudobulk Δ vs control, quantiles over conditions
    above_noise_fraction: float  # conditions whose Δ beats every random control subset of the same size
    de_top20_fraction: float  # share of a condition's |Δ| carried by its top-20 genes (mean)

    recommended_split: str | None  # None: one perturbation in one context, nothing to hold out
    recommended_n_genes: int | None  # highly variable genes to keep (perturbed genes always kept); None: all
    alternative_splits: list[str]
    recommended_metrics: list[str]
    notes: list[str]
    # No context column detected, but these obs columns look like cell types / contexts (pass --context-key).
    context_candidates: list[str] = []


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {k: 0.0 for k in QUANTILES}
    qs = np.quantile(values.astype(np.float64), list(QUANTILES.values()))
    return {k: round(float(v), 4) for k, v in zip(QUANTILES, qs, strict=True)}


@dataclass
class _Pass:
    """Accumulated in one chunked pass over X."""

    library: np.ndarray
    detected: np.ndarray
    nnz: int
    sums: np.ndarray  # (groups + pseudo-groups) x RNA genes: sums of log-normalized expression
    ctrl_sq: np.ndarray  # control contexts x RNA genes: sums of squares over control cells


@dataclass
class _Groups:
    """Which row of the pseudobulk sums each cell adds to."""

    codes: np.ndarray  # per cell: its condition's index in `names`
    names: pd.Index
    ctrl_codes: np.ndarray  # per cell: index of its context's control group in `ctrl_names`, -1 if not a control
    ctrl_names: pd.Index  # the control condition keys
    pseudo_codes: np.ndarray  # per cell: pseudo-group index or -1 (random control subsets: the noise null)
    n_pseudo: int
    pseudo_size: int
    pseudo_control: str  # the control condition the pseudo-groups are drawn from


N_PSEUDO = 20
_EFFECT_BLOCK = 256


def _groups(obs: pd.DataFrame, typical_size: int, seed: int = 0) -> _Groups:
    codes, names = pd.factorize(obs[CONDITION].to_numpy(dtype=object), sort=True)
    is_ctrl = obs[IS_CONTROL].to_numpy(dtype=bool)
    ctrl_names = pd.Index(sorted(obs.loc[is_ctrl, CONDITION].unique()))
    ctrl_codes = np.where(is_ctrl, ctrl_names.get_indexer(obs[CONDITION].to_numpy(dtype=object)), -1)
    # Random subsets of the largest control group, of a typical condition's size, compared to their own
    # control mean: how large Δ gets from sampling alone, gene correlations included.
    biggest = obs.loc[is_ctrl, CONDITION].value_counts()
    pseudo_codes = np.full(len(obs), -1)
    n_pseudo, size, source = 0, 0, ""
    if len(biggest):
        source = str(biggest.index[0])
        members = np.flatnonzero(obs[CONDITION].to_numpy(dtype=object) == source)
        size = int(min(max(typical_size, 1), len(members) // 2))
        n_pseudo = min(N_PSEUDO, len(members) // max(size, 1)) if size >= 2 else 0
        chosen = np.random.default_rng(seed).permutation(members)[: n_pseudo * size]
        pseudo_codes[chosen] = np.repeat(np.arange(n_pseudo), size)
    return _Groups(codes, pd.Index(names), ctrl_codes, ctrl_names, pseudo_codes, n_pseudo, size, source)


def _indicator(rows_a: np.ndarray, rows_b: np.ndarray, n_a: int, n_b: int) -> sp.csr_matrix:
    """(n_a + n_b) x cells 0/1 matrix: cell i adds to row rows_a[i] and, when rows_b[i] >= 0, to n_a + rows_b[i]."""
    cells = np.arange(len(rows_a))
    extra = rows_b >= 0
    r = np.concatenate([rows_a, n_a + rows_b[extra]])
    c = np.concatenate([cells, cells[extra]])
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(n_a + n_b, len(rows_a)))


def _scan(dataset: Dataset, groups: _Groups, on_progress: Callable[[float], None] | None) -> _Pass:
    adata, rna = dataset.adata, dataset.rna_mask
    rna_cols = None if rna.all() else np.flatnonzero(rna)
    n_rna = int(rna.sum())
    n_groups, n_ctrl = len(groups.names), len(groups.ctrl_names)
    library = np.zeros(adata.n_obs)
    detected = np.zeros(adata.n_obs)
    sums = np.zeros((n_groups + groups.n_pseudo, n_rna))
    ctrl_sq = np.zeros((n_ctrl, n_rna))
    nnz = 0
    for start, block in row_chunks(adata.X):
        stop = start + block.shape[0]
        nnz += block.nnz if sp.issparse(block) else int(np.count_nonzero(block))
        if rna_cols is not None:
            block = block[:, rna_cols]
        library[start:stop] = np.asarray(block.sum(axis=1)).ravel()
        detected[start:stop] = block.getnnz(axis=1) if sp.issparse(block) else np.count_nonzero(block, axis=1)
        lognorm = normalize_log1p(block) if dataset.layout.rna_is_counts else block
        summed = _indicator(groups.codes[start:stop], groups.pseudo_codes[start:stop], n_groups, groups.n_pseudo) @ lognorm
        sums += summed.toarray() if sp.issparse(summed) else summed
        ctrl_rows = groups.ctrl_codes[start:stop]
        squares = lognorm.multiply(lognorm) if sp.issparse(lognorm) else np.asarray(lognorm, dtype=np.float64) ** 2
        cells = np.flatnonzero(ctrl_rows >= 0)
        ctrl_ind = sp.csr_matrix((np.ones(len(cells)), (ctrl_rows[cells], cells)), shape=(n_ctrl, len(ctrl_rows)))
        summed_sq = ctrl_ind @ squares
        ctrl_sq += summed_sq.toarray() if sp.issparse(summed_sq) else summed_sq
        if on_progress is not None:
            on_progress(stop / adata.n_obs)
    return _Pass(library=library, detected=detected, nnz=nnz, sums=sums, ctrl_sq=ctrl_sq)


def _chi2(delta: np.ndarray, var: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per-gene sum of Δ² over its sampling variance (genes that vary in controls only)."""
    safe = np.where(var > 0, var, np.inf)
    return (delta**2 / safe).sum(axis=1) / scale


def _effects(obs: pd.DataFrame, groups: _Groups, scan: _Pass, gene_names: pd.Index) -> dict:
    """Δ statistics per condition from the pseudobulk sums."""
    n_groups = len(groups.names)
    sizes = np.bincount(groups.codes, minlength=n_groups).astype(np.float64)
    means = scan.sums[:n_groups] / np.maximum(sizes, 1)[:, None]
    ctrl_idx = groups.names.get_indexer(groups.ctrl_names)
    ctrl_n = sizes[ctrl_idx]
    ctrl_mean = means[ctrl_idx]
    ctrl_var = np.maximum(scan.ctrl_sq / np.maximum(ctrl_n, 1)[:, None] - ctrl_mean**2, 0.0)
    pooled_mean = scan.sums[ctrl_idx].sum(axis=0) / max(ctrl_n.sum(), 1)
    pooled_var = np.maximum(scan.ctrl_sq.sum(axis=0) / max(ctrl_n.sum(), 1) - pooled_mean**2, 0.0)

    is_ctrl = obs[IS_CONTROL].to_numpy(dtype=bool)
    table = obs.loc[~is_ctrl, [CONDITION, PERTURBATION, CONTEXT]].drop_duplicates(CONDITION)
    idx = groups.names.get_indexer(table[CONDITION])
    ctx_to_ctrl = obs.loc[is_ctrl, [CONTEXT, CONDITION]].drop_duplicates().set_index(CONTEXT)[CONDITION]
    own = groups.ctrl_names.get_indexer(table[CONTEXT].map(ctx_to_ctrl).fillna("").to_numpy())
    base_n = np.where(own >= 0, ctrl_n[np.maximum(own, 0)], ctrl_n.sum())
    gene_pos = gene_names.get_indexer(table[PERTURBATION])  # single-gene perturbations of a measured gene

    if groups.n_pseudo >= 5:
        src = groups.ctrl_names.get_loc(groups.pseudo_control)
        pseudo_delta = scan.sums[n_groups:] / groups.pseudo_size - ctrl_mean[src]
        # A subset is part of the mean it is compared to, hence 1/m - 1/n (not +).
        scale = np.full(groups.n_pseudo, 1.0 / groups.pseudo_size - 1.0 / ctrl_n[src])
        threshold = float(_chi2(pseudo_delta, ctrl_var[src][None, :], scale).max())
    else:  # too few controls for an empirical null: chi-square with n_genes dof, z > 3
        n_var = max(int((pooled_var > 0).sum()), 1)
        threshold = n_var + 3 * np.sqrt(2 * n_var)

    # Conditions x genes temporaries are made a block of conditions at a time, to bound memory.
    n = len(idx)
    norms, chi2, top_share = np.zeros(n), np.zeros(n), np.zeros(n)
    knock: list[bool] = []
    k = min(20, means.shape[1])
    for lo in range(0, n, _EFFECT_BLOCK):
        sl = slice(lo, min(n, lo + _EFFECT_BLOCK))
        has = (own[sl] >= 0)[:, None]
        rows = np.maximum(own[sl], 0)
        delta = means[idx[sl]] - np.where(has, ctrl_mean[rows], pooled_mean)
        var = np.where(has, ctrl_var[rows], pooled_var)
        norms[sl] = np.sqrt((delta**2).sum(axis=1))
        chi2[sl] = _chi2(delta, var, 1.0 / np.maximum(sizes[idx[sl]], 1) + 1.0 / np.maximum(base_n[sl], 1))
        np.abs(delta, out=delta)
        total = delta.sum(axis=1)
        top = np.partition(delta, delta.shape[1] - k, axis=1)[:, -k:].sum(axis=1)
        top_share[sl] = np.divide(top, total, out=np.zeros_like(top), where=total > 0)
        pos = gene_pos[sl]
        single = np.flatnonzero(pos >= 0)
        # Knock-down: the target's own expression is lower than in control.
        target_delta = means[idx[sl][single], pos[single]] - np.where(
            has[single, 0], ctrl_mean[rows[single], pos[single]], pooled_mean[pos[single]])
        knock += list(target_delta < 0)
    return {
        "delta_norm": _quantiles(norms),
        "above_noise_fraction": float((chi2 > threshold).mean()) if n else 0.0,
        "de_top20_fraction": float(top_share.mean()) if n else 0.0,
        "target_knockdown_fraction": float(np.mean(knock)) if knock else None,
    }


def _combos(perts: list[str]) -> CombosProfile | None:
    combos = [p for p in perts if COMBO_SEPARATOR in p]
    if not combos:
        return None
    singles = {p for p in perts if COMBO_SEPARATOR not in p}
    present = [sum(g in singles for g in combo_genes(c)) for c in combos]
    return CombosProfile(
        n_combos=len(combos), n_singles=len(singles),
        both_singles_present=sum(k >= 2 for k in present), one_single_present=sum(k == 1 for k in present),
        no_single_present=sum(k == 0 for k in present),
    )


def _doses(perturbed: pd.DataFrame) -> DoseProfile | None:
    dosed = perturbed.dropna(subset=[DOSE])
    if dosed.empty:
        return None
    per_drug = dosed.groupby(PERTURBATION)[DOSE].apply(lambda d: sorted(float(x) for x in set(d)))
    counts = per_drug.map(len)
    return DoseProfile(
        n_drugs=len(per_drug), dose_levels=sorted(float(x) for x in dosed[DOSE].unique()),
        levels_per_drug_min=int(counts.min()), levels_per_drug_max=int(counts.max()),
        doses_per_drug={str(k): v for k, v in list(per_drug.items())[:_LIST_LIMIT]},
    )


def _contexts(obs: pd.DataFrame) -> ContextProfile | None:
    contexts = obs[CONTEXT].astype(str)
    if contexts.nunique() < 2:
        return None
    perturbed = obs.loc[~obs[IS_CONTROL].to_numpy()]
    per_ctx = perturbed.groupby(CONTEXT)[PERTURBATION].nunique()
    grid = perturbed.groupby(PERTURBATION)[CONTEXT].nunique()
    n_ctx = contexts.nunique()
    return ContextProfile(
        n_contexts=n_ctx,
        cells=contexts.value_counts().astype(int).to_dict(),
        control_cells=obs.loc[obs[IS_CONTROL].to_numpy(), CONTEXT].astype(str).value_counts().astype(int).to_dict(),
        perturbations={str(k): int(v) for k, v in per_ctx.items()},
        perturbations_in_all_contexts=int((grid == n_ctx).sum()),
        coverage=float(grid.sum() / max(len(grid) * n_ctx, 1)),
    )


NOTHING_TO_HOLD_OUT = "no split can hold anything out to test a model"
FEW_PERTURBATIONS = 5  # below this, holding perturbations out leaves too little to learn from


def _recommend(kind: str, n_contexts: int, combos: CombosProfile | None, doses: DoseProfile | None,
               n_perturbations: int, modalities: list[str], median_cells: float
               ) -> tuple[str | None, list[str], list[str]]:
    """The split that asks the question this data can answer best (None: nothing can be held out), the other
    applicable ones, and metrics."""
    applicable = ["unseen-perturbation"] if n_perturbations >= 2 else []
    if combos is not None:
        applicable.insert(0, "combo")
    if doses is not None:
        if n_perturbations >= 2:
            applicable.insert(0, "unseen-drug")
        if doses.levels_per_drug_max >= 2:
            applicable.insert(0, "unseen-dose")
    if n_contexts >= 2:
        applicable.append("unseen-context")
    few = n_perturbations < FEW_PERTURBATIONS
    if kind == "genetic_combo" and combos is not None:
        preferred = "combo"
    elif kind == "chemical" and doses is not None:
        preferred = "unseen-dose" if few and doses.levels_per_drug_max >= 2 else "unseen-drug"
    elif few and n_contexts >= 2:
        preferred = "unseen-context"
    else:
        preferred = "unseen-perturbation"
    split = preferred if preferred in applicable else next(iter(applicable), None)
    if kind == "chemical" and "unseen-perturbation" in applicable and doses is not None:
        applicable.remove("unseen-perturbation")  # same as unseen-drug when every drug has a dose
    alternatives = [s for s in applicable if s != split]
    metrics = ["pearson_delta", "pearson_delta_pert", "mse_top20_de", "pearson_delta_top20_de",
               "direction_acc_top20_de", "r2_delta", "discrimination_l1", "mse", "pearson"]
    if median_cells >= DE_OVERLAP_MIN_CELLS:
        metrics.append("de_overlap")
    if "atac" in modalities:
        metrics += ["atac_roc_auc", "atac_pr_auc"]
    return split, alternatives, metrics


def profile_dataset(data: str | Path | ad.AnnData | Dataset, *, perturbation_key: str | None = None,
                    control: str | None = None, dose_key: str | None = None, context_key: str | None = None,
                    min_cells: int = DEFAULT_MIN_CELLS, backed: bool | None = None,
                    on_progress: Callable[[float], None] | None = None) -> DataProfile:
    """Load (if needed), validate and profile a perturbation dataset."""
    dataset = data if isinstance(data, Dataset) else load_dataset(
        data, perturbation_key=perturbation_key, control=control, dose_key=dose_key, context_key=context_key,
        min_cells=min_cells, backed=backed)
    layout, obs, adata = dataset.layout, dataset.obs, dataset.adata
    is_ctrl = obs[IS_CONTROL].to_numpy(dtype=bool)
    typical = int(obs.loc[~is_ctrl, CONDITION].value_counts().median()) if (~is_ctrl).any() else 0
    groups = _groups(obs, typical)
    scan = _scan(dataset, groups, on_progress)
    rna_names = dataset.gene_names[dataset.rna_mask]
    effects = _effects(obs, groups, scan, pd.Index(rna_names))

    perturbed = obs.loc[~is_ctrl]
    cond_sizes = perturbed[CONDITION].value_counts().to_numpy()
    perts = sorted(perturbed[PERTURBATION].unique())
    small = perturbed[CONDITION].value_counts()
    small = small[small < SMALL_CONDITION_CELLS].sort_values()
    combos = _combos(perts)
    doses = _doses(perturbed)
    contexts = _contexts(obs)
    n_contexts = contexts.n_contexts if contexts else 1

    targets: list[str] = []
    if layout.kind in ("genetic", "genetic_combo") and dataset.rna_mask.any():
        targets = sorted({g for p in perts for g in combo_genes(p)})
    elif dataset.annotations and dataset.rna_mask.any():
        targets = sorted({g for genes in dataset.annotations.values() for g in genes})
    measured = set(rna_names)
    missing = [t for t in targets if t not in measured]

    n_batches = int(obs[BATCH].nunique()) if BATCH in obs.columns else 1
    one_batch = None
    if BATCH in obs.columns and n_batches > 1:
        one_batch = float((perturbed.groupby(CONDITION)[BATCH].nunique() == 1).mean())

    feature_types = pd.Series(dataset.feature_block).value_counts().astype(int).to_dict()
    median_cells = float(np.median(cond_sizes)) if cond_sizes.size else 0.0
    split, alternatives, metrics = _recommend(layout.kind, n_contexts, combos, doses, len(perts),
                                              list(layout.modalities), median_cells)

    notes: list[str] = []
    if len(small):
        notes.append(f"{len(small)} of {len(cond_sizes)} conditions have fewer than {SMALL_CONDITION_CELLS} cells; "
                     "their pseudobulk and DE genes are noisy")
    if targets and missing and not dataset.annotations:
        notes.append(f"{len(missing)} of {len(targets)} target genes are not measured; their own knock-down "
                     "cannot be predicted or scored")
    annotated = len([p for p in perts if dataset.annotations.get(p)]) / len(perts) if dataset.annotations and perts \
        else None
    if annotated is not None:
        notes.append(f"{annotated:.0%} of perturbations are annotated in obs[{layout.annotation_key!r}] "
                     f"({len(targets) - len(missing)} of {len(targets)} annotated targets are measured genes): "
                     "an unseen perturbation can be described by its targets (a stimulus by its receptors, whose "
                     "level in a cell type unseen in training can say how strongly it responds)")
    knockdown = effects["target_knockdown_fraction"]
    direction = None if knockdown is None else "down" if knockdown >= 0.7 else "up" if knockdown <= 0.3 else "mixed"
    if direction == "up":
        notes.append(f"{1 - knockdown:.0%} of measured targets go up in their own condition: an activation "
                     "(CRISPRa / overexpression) screen")
    elif direction == "mixed":
        notes.append(f"measured targets move both ways ({knockdown:.0%} down): weak guides or mislabelled cells")
    if dataset.rna_mask.any() and effects["above_noise_fraction"] < 0.3:
        notes.append(f"weak effects: only {effects['above_noise_fraction']:.0%} of conditions differ from control "
                     "beyond sampling noise; the control baseline will be hard to beat")
    if one_batch is not None and one_batch > 0.8:
        notes.append(f"{one_batch:.0%} of conditions sit in a single batch: perturbation and batch are confounded")
    if combos is not None and combos.both_singles_present < combos.n_combos:
        notes.append(f"{combos.n_combos - combos.both_singles_present} of {combos.n_combos} combos lack a single "
                     "for one of their genes; additive baselines fall back for them")
    if split is None:
        notes.append(f"{NOTHING_TO_HOLD_OUT}: one perturbation ({', '.join(perts)}) in one context; with a column of "
                     "cell types (--context-key COLUMN; obs columns: "
                     f"{preview([str(c) for c in dataset.adata.obs.columns])}) it can be predicted in a held-out one")
    if layout.context_candidates:
        notes.append(f"no context column under a known name, but obs column(s) {', '.join(layout.context_candidates)} "
                     f"look like cell types: pass --context-key {layout.context_candidates[0]} to use it, or "
                     f"--context-key {POOLED} to pool every cell")
    if contexts is not None and contexts.coverage < 1.0:
        notes.append(f"contexts x perturbations grid is {contexts.coverage:.0%} filled")
    if contexts is not None and any(v == 0 for v in (contexts.control_cells.get(c, 0) for c in contexts.cells)):
        notes.append("some contexts have no control cells and cannot be held out by unseen-context")

    return DataProfile(
        source=layout.source, n_cells=adata.n_obs, n_genes=int(dataset.rna_mask.sum()), n_features=adata.n_vars,
        feature_types={str(k): int(v) for k, v in feature_types.items()}, modalities=list(layout.modalities),
        normalization="raw_counts" if layout.rna_is_counts else "log_normalized", perturbation_kind=layout.kind,
        perturbation_key=layout.perturbation_key, control_labels=layout.control_labels, dose_key=layout.dose_key,
        context_key=layout.context_key, context_candidates=layout.context_candidates, batch_key=layout.batch_key,
        backed=layout.backed,
        n_perturbations=len(perts), n_conditions=len(cond_sizes), n_control_cells=int(is_ctrl.sum()),
        cells_per_condition=_quantiles(cond_sizes), cells_per_condition_median=median_cells,
        cells_per_condition_min=float(cond_sizes.min()) if cond_sizes.size else 0.0,
        small_conditions=[str(k) for k in small.index[:_LIST_LIMIT]], n_small_conditions=len(small),
        sparsity=round(1.0 - scan.nnz / max(adata.n_obs * adata.n_vars, 1), 4),
        library_size=_quantiles(scan.library), genes_detected=_quantiles(scan.detected),
        n_contexts=n_contexts, contexts=contexts,
        n_doses=len([d for d in doses.dose_levels if d != 0]) if doses else 0, doses=doses,
        n_combos=combos.n_combos if combos else 0, combos=combos,
        n_batches=n_batches, conditions_in_one_batch_fraction=one_batch,
        annotation_key=layout.annotation_key, annotated_perturbations_fraction=annotated,
        n_target_genes=len(targets) if targets else None,
        target_genes_measured_fraction=(1 - len(missing) / len(targets)) if targets else None,
        targets_not_measured=missing[:_LIST_LIMIT], target_knockdown_fraction=knockdown,
        target_direction=direction,
        delta_norm=effects["delta_norm"], above_noise_fraction=effects["above_noise_fraction"],
        de_top20_fraction=effects["de_top20_fraction"],
        recommended_split=split,
        recommended_n_genes=HVG_KEEP if int(dataset.rna_mask.sum()) > HVG_ABOVE else None,
        alternative_splits=alternatives, recommended_metrics=metrics, notes=notes,
    )
