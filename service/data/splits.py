"""Seeded train/val/test splits, disjoint in conditions, written as the split directory of docs/contracts.md.

A scheme decides which *conditions* (perturbation, dose, context) are held out; cells follow their
condition. Control cells always go to train; `test_inputs.h5ad` repeats the controls of every context
that has a test condition, plus the list of conditions to predict, and nothing else about them.
The test cells themselves go only to `test_truth.h5ad`, which never enters a sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
from pydantic import BaseModel, ValidationError

from .conditions import BATCH, CONDITION, CONTEXT, DOSE, IS_CONTROL, PERTURBATION, STANDARD_OBS_COLUMNS, combo_genes
from .errors import SplitDirectoryError, SplitError, preview
from .load import DEFAULT_MIN_CELLS, Dataset, load_dataset, read_h5ad
from .preprocess import (
    ATAC_TRANSFORMS,
    NORMALIZATION,
    highly_variable_genes,
    inverse_document_frequency,
    transform_blocks,
)

Scheme = Literal["unseen-perturbation", "combo", "unseen-drug", "unseen-dose", "unseen-context"]
SCHEMES: tuple[str, ...] = ("unseen-perturbation", "combo", "unseen-drug", "unseen-dose", "unseen-context")
PARTS = ("train", "val", "test_inputs", "test_truth")
SPLIT_FILES = tuple(f"{p}.h5ad" for p in PARTS) + ("split.json",)
TARGETS_UNS = "perturbation_targets"  # uns key of the per-perturbation annotation table
FEATURE_TYPE_NAMES = {"rna": "Gene Expression", "protein": "Antibody Capture", "atac": "Peaks"}


class SplitInfo(BaseModel):
    """The content of `split.json`."""

    version: int = 1
    scheme: str
    seed: int
    source: str
    perturbation_key: str
    control_label: str
    control_labels: list[str]
    dose_key: str | None
    context_key: str | None
    annotation_key: str | None = None  # obs column the uns["perturbation_targets"] tables come from
    kind: str
    modalities: list[str]
    conditions: dict[str, list[str]]
    n_cells: dict[str, int]
    genes: list[str]
    normalization: str = NORMALIZATION
    # Per held-out (val/test) condition: combo `seen0|seen1|seen2|unseen_single`,
    # dose `interpolation|extrapolation`, context `zero_shot|few_shot`; absent for plain held-out perturbations.
    categories: dict[str, str] = {}
    held_out_context: str | None = None
    few_shot_k: int = 0
    feature_types: dict[str, int] = {}
    atac_transform: str | None = None  # "binarize" or "tfidf" (idf of the training cells) when there are peaks


@dataclass
class ConditionAssignment:
    """Where each non-control condition goes, and the category of each held-out one."""

    part: dict[str, str]  # condition -> train | val | test
    categories: dict[str, str] = field(default_factory=dict)
    held_out_context: str | None = None


def _sizes(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """How many of n units go to test and val: at least one each when possible, at least one left to train."""
    if n < 2:
        return 0, 0
    n_test = min(max(1, round(test_fraction * n)), n - 1)
    n_val = min(max(1, round(val_fraction * n)), n - 1 - n_test) if val_fraction > 0 else 0
    return n_test, n_val


def _shuffled(values, rng: np.random.Generator) -> list:
    items = sorted(values, key=str)
    return [items[i] for i in rng.permutation(len(items))]


def _by_unit(conds: pd.DataFrame, unit: pd.Series, units_part: dict) -> dict[str, str]:
    return {c: units_part.get(u, "train") for c, u in zip(conds[CONDITION], unit, strict=True)}


def _unseen_perturbation(conds: pd.DataFrame, rng, test_fraction: float, val_fraction: float,
                         what: str = "perturbations") -> ConditionAssignment:
    units = _shuffled(conds[PERTURBATION].unique(), rng)
    n_test, n_val = _sizes(len(units), test_fraction, val_fraction)
    if n_test == 0:
        raise SplitError(f"need at least 2 distinct {what} to hold any out; found {preview(units)}")
    part = {u: "test" for u in units[:n_test]} | {u: "val" for u in units[n_test:n_test + n_val]}
    return ConditionAssignment(_by_unit(conds, conds[PERTURBATION], part))


def _combo(conds: pd.DataFrame, rng, test_fraction: float, val_fraction: float) -> ConditionAssignment:
    perts = conds[PERTURBATION].unique()
    combos = [p for p in perts if len(combo_genes(p)) > 1]
    singles = [p for p in perts if len(combo_genes(p)) == 1]
    if not combos:
        raise SplitError(f"scheme 'combo' needs combinations written 'A+B'; the perturbations are single: "
                         f"{preview(perts)} (use unseen-perturbation)")
    # Hold out some single genes entirely so that test combos cover 0, 1 and 2 genes seen as singles.
    shuffled = _shuffled(singles, rng)
    n_test, n_val = _sizes(len(shuffled), test_fraction, val_fraction) if len(shuffled) >= 3 else (0, 0)
    unseen_test, unseen_val = set(shuffled[:n_test]), set(shuffled[n_test:n_test + n_val])
    seen = set(singles) - unseen_test - unseen_val

    part: dict[str, str] = {}
    categories: dict[str, str] = {}
    for g in unseen_test:
        part[g], categories[g] = "test", "unseen_single"
    for g in unseen_val:
        part[g], categories[g] = "val", "unseen_single"
    fully_seen = []
    for c in combos:
        parts = combo_genes(c)
        k = sum(g in seen for g in parts)
        category = f"seen{min(k, 2)}"
        if k == len(parts):
            fully_seen.append(c)
        elif any(g in unseen_test for g in parts) or not any(g in unseen_val for g in parts):
            part[c], categories[c] = "test", category
        else:
            part[c], categories[c] = "val", category
    fully_seen = _shuffled(fully_seen, rng)
    c_test, c_val = _sizes(len(fully_seen), test_fraction, val_fraction)
    for c in fully_seen[:c_test]:
        part[c], categories[c] = "test", "seen2"
    for c in fully_seen[c_test:c_test + c_val]:
        part[c], categories[c] = "val", "seen2"
    assignment = _by_unit(conds, conds[PERTURBATION], part)
    cond_categories = {cond: categories[p] for cond, p in zip(conds[CONDITION], conds[PERTURBATION], strict=True)
                       if p in categories}
    return ConditionAssignment(assignment, cond_categories)


def _require_dose(dataset: Dataset, scheme: str) -> None:
    if dataset.layout.dose_key is None:
        raise SplitError(f"scheme {scheme!r} needs a dose column; obs has none "
                         f"(columns: {preview(dataset.adata.obs.columns, 30)}); use unseen-perturbation")


def _unseen_dose(conds: pd.DataFrame, rng, val_fraction: float) -> ConditionAssignment:
    levels = conds.groupby(PERTURBATION)[DOSE].apply(lambda d: sorted(set(d.dropna())))
    multi = levels[levels.map(len) >= 2]
    if multi.empty:
        raise SplitError(f"scheme 'unseen-dose' needs a drug measured at 2 or more doses; dose levels per drug: "
                         f"{preview([f'{k}: {v}' for k, v in levels.items()])}")
    held: dict[tuple[str, float], str] = {}
    for drug in _shuffled(multi.index, rng):
        doses = multi[drug]
        # A val dose too only where train still keeps two doses to interpolate between.
        picks = rng.choice(len(doses), size=2 if len(doses) >= 4 else 1, replace=False)
        held[(drug, doses[picks[0]])] = "test"
        if len(picks) > 1:
            held[(drug, doses[picks[1]])] = "val"
    if "val" not in held.values() and len(multi) > 1:
        # No drug with 4+ doses: give the held-out dose of a few drugs to val instead of test.
        tests = _shuffled([k for k, v in held.items() if v == "test"], rng)
        for key in tests[:min(max(1, round(val_fraction * len(tests))), len(tests) - 1)]:
            held[key] = "val"
    part: dict[str, str] = {}
    categories: dict[str, str] = {}
    for cond, drug, dose in zip(conds[CONDITION], conds[PERTURBATION], conds[DOSE], strict=True):
        where = held.get((drug, dose), "train")
        part[cond] = where
        if where != "train":
            kept = [d for d in multi[drug] if held.get((drug, d), "train") == "train"]
            inside = bool(kept) and min(kept) < dose < max(kept)
            categories[cond] = "interpolation" if inside else "extrapolation"
    return ConditionAssignment(part, categories)


def _unseen_context(dataset: Dataset, conds: pd.DataFrame, rng, val_fraction: float, context: str | None,
                    few_shot_k: int) -> ConditionAssignment:
    obs = dataset.obs
    with_controls = set(obs.loc[obs[IS_CONTROL], CONTEXT])
    contexts = sorted(set(conds[CONTEXT]) & with_controls)
    if len(set(obs[CONTEXT])) < 2:
        raise SplitError("scheme 'unseen-context' needs 2 or more contexts; "
                         f"context column {dataset.layout.context_key!r} has {preview(set(obs[CONTEXT]))}")
    if context is None:
        if not contexts:
            raise SplitError("no context has both control cells and perturbed cells")
        context = contexts[int(rng.integers(len(contexts)))]
    elif context not in contexts:
        raise SplitError(f"context {context!r} cannot be held out; contexts with controls "
                         f"and perturbations: {preview(contexts)}")
    in_ctx = conds[CONTEXT] == context
    held = _shuffled(conds.loc[in_ctx, CONDITION], rng)
    if few_shot_k >= len(held):
        raise SplitError(f"few_shot_k={few_shot_k} keeps every one of the {len(held)} conditions of context "
                         f"{context!r} in train; expected fewer")
    part = {c: "test" for c in held[few_shot_k:]} | {c: "train" for c in held[:few_shot_k]}
    others = _shuffled(conds.loc[~in_ctx, CONDITION], rng)
    n_val = min(max(1, round(val_fraction * len(others))), len(others) - 1) if len(others) >= 2 else 0
    part |= {c: "val" for c in others[:n_val]} | {c: "train" for c in others[n_val:]}
    label = "few_shot" if few_shot_k else "zero_shot"
    return ConditionAssignment(part, {c: label for c in held[few_shot_k:]}, held_out_context=context)


def assign_conditions(dataset: Dataset, scheme: str, seed: int, *, test_fraction: float = 0.2,
                      val_fraction: float = 0.1, context: str | None = None, few_shot_k: int = 0) -> ConditionAssignment:
    """Decide train/val/test per (non-control) condition for `scheme`, reproducibly from `seed`."""
    if scheme not in SCHEMES:
        raise SplitError(f"unknown split scheme {scheme!r}; expected one of {preview(SCHEMES)}")
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise SplitError(f"fractions test={test_fraction}, val={val_fraction}: expected 0 < test, 0 <= val, sum < 1")
    obs = dataset.obs
    conds = (obs.loc[~obs[IS_CONTROL].to_numpy(), [CONDITION, PERTURBATION, DOSE, CONTEXT]]
             .drop_duplicates(CONDITION).sort_values(CONDITION).reset_index(drop=True))
    if conds.empty:
        raise SplitError(f"{dataset.layout.source}: only control cells; nothing to hold out")
    rng = np.random.default_rng(seed)
    try:
        return _SCHEME_FUNCTIONS[scheme](dataset, conds, rng, test_fraction=test_fraction, val_fraction=val_fraction,
                                         context=context, few_shot_k=few_shot_k)
    except SplitError as exc:
        raise SplitError(f"{dataset.layout.source}: {exc}") from None


def _scheme_unseen_perturbation(dataset, conds, rng, *, test_fraction, val_fraction, **_) -> ConditionAssignment:
    return _unseen_perturbation(conds, rng, test_fraction, val_fraction)


def _scheme_combo(dataset, conds, rng, *, test_fraction, val_fraction, **_) -> ConditionAssignment:
    return _combo(conds, rng, test_fraction, val_fraction)


def _scheme_unseen_drug(dataset, conds, rng, *, test_fraction, val_fraction, **_) -> ConditionAssignment:
    _require_dose(dataset, "unseen-drug")
    return _unseen_perturbation(conds, rng, test_fraction, val_fraction, what="drugs")


def _scheme_unseen_dose(dataset, conds, rng, *, val_fraction, **_) -> ConditionAssignment:
    _require_dose(dataset, "unseen-dose")
    return _unseen_dose(conds, rng, val_fraction)


def _scheme_unseen_context(dataset, conds, rng, *, val_fraction, context, few_shot_k, **_) -> ConditionAssignment:
    return _unseen_context(dataset, conds, rng, val_fraction, context, few_shot_k)


_SCHEME_FUNCTIONS: dict[str, Callable[..., ConditionAssignment]] = {
    "unseen-perturbation": _scheme_unseen_perturbation,
    "combo": _scheme_combo,
    "unseen-drug": _scheme_unseen_drug,
    "unseen-dose": _scheme_unseen_dose,
    "unseen-context": _scheme_unseen_context,
}


def _rows(X, mask: np.ndarray):
    """The rows of X under mask; on a backed dataset only those rows are read from disk."""
    return X[np.flatnonzero(mask)]


def _part_obs(dataset: Dataset, mask: np.ndarray) -> pd.DataFrame:
    cols = [c for c in (*STANDARD_OBS_COLUMNS, BATCH) if c in dataset.obs.columns]
    obs = dataset.obs.loc[mask, cols].copy()
    obs[IS_CONTROL] = obs[IS_CONTROL].astype(bool)
    return obs


def _targets_table(dataset: Dataset, obs: pd.DataFrame, masks: dict[str, np.ndarray],
                   name: str) -> dict[str, list[str]]:
    """Equal-length lists `perturbation` and `targets` (`;`-joined) for the perturbations a model-facing
    part concerns: its own cells' for train/val, the conditions to predict for test_inputs (an input,
    like the name). Lists, not a dict keyed by perturbation: h5ad would nest a key holding '/'."""
    cells = masks["test_truth"] if name == "test_inputs" else masks[name]
    perts = sorted(set(obs.loc[cells & ~obs[IS_CONTROL].to_numpy(dtype=bool), PERTURBATION]))
    perts = [p for p in perts if p in dataset.annotations]
    return {PERTURBATION: perts, "targets": [";".join(dataset.annotations[p]) for p in perts]}


def make_split(data: str | Path | ad.AnnData | Dataset, scheme: str, seed: int, out_dir: str | Path,
               n_genes: int | None = None, *, perturbation_key: str | None = None, control: str | None = None,
               dose_key: str | None = None, context_key: str | None = None, min_cells: int = DEFAULT_MIN_CELLS,
               test_fraction: float = 0.2, val_fraction: float = 0.1, context: str | None = None,
               few_shot_k: int = 0, atac: str = "binarize", backed: bool | None = None,
               on_progress=None) -> SplitInfo:
    """Split a dataset by `scheme` and write the split directory; returns what split.json holds.

    `n_genes` keeps that many highly variable genes (chosen on training cells only, perturbed genes
    always kept); proteins (CLR) and peaks (`atac`: binarize or TF-IDF) are kept whole in their own blocks.
    """
    if atac not in ATAC_TRANSFORMS:
        raise SplitError(f"atac transform {atac!r}: expected one of {preview(ATAC_TRANSFORMS)}")
    def progress(msg: str) -> None:
        if on_progress is not None:
            on_progress(msg)

    dataset = data if isinstance(data, Dataset) else load_dataset(
        data, perturbation_key=perturbation_key, control=control, dose_key=dose_key, context_key=context_key,
        min_cells=min_cells, backed=backed)
    layout, obs = dataset.layout, dataset.obs
    progress("assigning conditions")
    plan = assign_conditions(dataset, scheme, seed, test_fraction=test_fraction, val_fraction=val_fraction,
                             context=context, few_shot_k=few_shot_k)
    cell_part = obs[CONDITION].map(plan.part).to_numpy(dtype=object)
    is_ctrl = obs[IS_CONTROL].to_numpy(dtype=bool)
    cell_part[is_ctrl] = "train"
    test_contexts = set(obs.loc[cell_part == "test", CONTEXT])
    masks = {
        "train": cell_part == "train",
        "val": cell_part == "val",
        "test_inputs": is_ctrl & obs[CONTEXT].isin(test_contexts).to_numpy(),
        "test_truth": cell_part == "test",
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = dataset.feature_block
    var_names = dataset.gene_names
    selected: np.ndarray | None = None
    feature_counts: dict[str, int] = {}
    multimodal = len(set(blocks[blocks != "other"])) > 1
    peaks = np.flatnonzero(blocks == "atac")
    idf: np.ndarray | None = None
    for name in PARTS:  # train first: gene selection and ATAC idf come from training cells only
        progress(f"writing {name}.h5ad")
        # Fancy row indexing returns a fresh matrix, so it can be normalized in its own buffers.
        rows = _rows(dataset.adata.X, masks[name])
        if atac == "tfidf" and peaks.size and idf is None:
            idf = inverse_document_frequency(rows[:, peaks])
        X, order = transform_blocks(rows, blocks, layout.rna_is_counts, atac, idf, in_place=True)
        del rows
        if selected is None:
            selected = np.arange(len(order))
            n_rna = int((blocks[order] == "rna").sum())
            if n_genes is not None and n_genes < n_rna:
                perturbed = {g for p in obs.loc[masks["train"] | masks["test_truth"] | masks["val"], PERTURBATION]
                             .unique() for g in combo_genes(p)}
                perturbed |= {g for genes in dataset.annotations.values() for g in genes}
                rna_block = X if n_rna == X.shape[1] else X[:, :n_rna]
                hvg = highly_variable_genes(rna_block, var_names[order[:n_rna]], n_genes, keep=perturbed)
                del rna_block
                selected = np.concatenate([hvg, np.arange(n_rna, len(order))])
            feature_counts = pd.Series(blocks[order[selected]]).map(FEATURE_TYPE_NAMES).value_counts().to_dict()
        if len(selected) != X.shape[1]:
            X = X[:, selected]
        var = pd.DataFrame(index=pd.Index(var_names[order[selected]], dtype=str))
        if layout.gene_symbols_key is not None:
            var["gene_id"] = dataset.adata.var_names[order[selected]].to_numpy()
        if multimodal:
            var["feature_types"] = pd.Series(blocks[order[selected]]).map(FEATURE_TYPE_NAMES).to_numpy()
        part = ad.AnnData(X=X, obs=_part_obs(dataset, masks[name]), var=var)
        if name == "test_inputs":
            predict = (obs.loc[masks["test_truth"], [CONDITION, PERTURBATION, DOSE, CONTEXT]]
                       .drop_duplicates(CONDITION).sort_values(CONDITION))
            part.uns["predict"] = {CONDITION: predict[CONDITION].astype(str).tolist(),
                                   PERTURBATION: predict[PERTURBATION].astype(str).tolist(),
                                   DOSE: predict[DOSE].astype(float).tolist(),
                                   CONTEXT: predict[CONTEXT].astype(str).tolist()}
        if dataset.annotations and name != "test_truth":
            part.uns[TARGETS_UNS] = _targets_table(dataset, obs, masks, name)
        part.write_h5ad(out / f"{name}.h5ad")
        del part, X

    genes = [str(g) for g in var_names[order[selected]]]
    info = SplitInfo(
        scheme=scheme, seed=seed, source=layout.source, perturbation_key=layout.perturbation_key,
        control_label=layout.control_labels[0], control_labels=layout.control_labels, dose_key=layout.dose_key,
        context_key=layout.context_key, annotation_key=layout.annotation_key, kind=layout.kind,
        modalities=list(layout.modalities),
        conditions={p: sorted(c for c, q in plan.part.items() if q == p) for p in ("train", "val", "test")},
        n_cells={name: int(m.sum()) for name, m in masks.items()}, genes=genes, categories=plan.categories,
        held_out_context=plan.held_out_context, few_shot_k=few_shot_k, feature_types=feature_counts,
        atac_transform=atac if peaks.size else None,
    )
    (out / "split.json").write_text(json.dumps(info.model_dump(), indent=1))
    return info


@dataclass
class Split:
    """A split directory; the parts are read on first access."""

    path: Path
    info: SplitInfo

    def _read(self, name: str) -> ad.AnnData:
        # A split directory may come from anyone (`cellforge baselines --split`): the checked opener.
        return read_h5ad(self.path / f"{name}.h5ad", backed=False)

    @cached_property
    def train(self) -> ad.AnnData:
        return self._read("train")

    @cached_property
    def val(self) -> ad.AnnData:
        return self._read("val")

    @cached_property
    def test_inputs(self) -> ad.AnnData:
        return self._read("test_inputs")

    @cached_property
    def test_truth(self) -> ad.AnnData:
        return self._read("test_truth")

    @property
    def predict(self) -> pd.DataFrame:
        """The test conditions to predict (from `test_inputs.uns["predict"]`)."""
        p = self.test_inputs.uns["predict"]
        return pd.DataFrame({k: np.asarray(p[k]) for k in (CONDITION, PERTURBATION, DOSE, CONTEXT)})


def perturbation_targets(split: Split) -> dict[str, list[str]]:
    """The annotation table of the model-facing parts merged (train, val, test_inputs): perturbation ->
    target genes / pathways; empty when the data has no annotation column."""
    out: dict[str, list[str]] = {}
    if split.info.annotation_key is None:
        return out
    for part in (split.train, split.val, split.test_inputs):
        table = part.uns.get(TARGETS_UNS, {})
        for pert, value in zip(table.get(PERTURBATION, []), table.get("targets", []), strict=True):
            out[str(pert)] = [g for g in str(value).split(";") if g]
    return out


def load_split(split_dir: str | Path) -> Split:
    """Open a split directory written by `make_split`; checks the files exist and split.json parses."""
    path = Path(split_dir)
    missing = [f for f in SPLIT_FILES if not (path / f).is_file()]
    if missing:
        raise SplitDirectoryError(f"{path}: not a complete split directory; missing {preview(missing)} "
                                  f"(expected {preview(SPLIT_FILES)})")
    try:
        info = SplitInfo.model_validate_json((path / "split.json").read_text())
    except (ValidationError, ValueError) as exc:
        raise SplitDirectoryError(f"{path / 'split.json'}: malformed ({exc})") from exc
    return Split(path, info)
