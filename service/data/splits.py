"""Seeded train/val/test splits, disjoint in conditions, written as the split directory of docs/contracts.md.

A scheme decides which *conditions* (perturbation, dose, context) are held out; cells follow their
condition. Validation is held out by the same scheme as the test, in whole groups (cell types,
genes/compounds, doses, combos), so it measures the skill the test asks for. Control cells always go
to train; `val_inputs.h5ad` / `test_inputs.h5ad` repeat the controls of every context that has a
val / test condition, plus the list of conditions to predict, and nothing else about them. The held-out
cells go only to `val_truth.h5ad` / `test_truth.h5ad`, which never enter a sandbox.

When the validation fold would be too small to decide (fewer than `MIN_VAL_CONDITIONS` conditions or
`MIN_VAL_GROUPS` groups), its conditions stay in train and `split.json` lists grouped cross-validation
folds over the training groups instead (`validation: "cv"`); `write_fold` turns one into a split
directory of its own.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ValidationError

from .chunks import row_chunks
from .conditions import (BATCH, CONDITION, CONTEXT, DOSE, IS_CONTROL, PERTURBATION, STANDARD_OBS_COLUMNS, TARGETS_UNS,
                         combo_genes, predict_frame, targets_of_part)
from .errors import SplitDirectoryError, SplitError, preview
from .load import DEFAULT_MIN_CELLS, UNKNOWN_CONTEXT, Dataset, load_dataset, read_h5ad
from .partwrite import Part, write_parts
from .preprocess import (
    ATAC_TRANSFORMS,
    NORMALIZATION,
    MeanVar,
    block_order,
    document_frequency,
    idf_of,
    normalize_log1p,
    select_variable_genes,
    transform_blocks,
)

Scheme = Literal["unseen-perturbation", "combo", "unseen-drug", "unseen-dose", "unseen-context"]
SCHEMES: tuple[str, ...] = ("unseen-perturbation", "combo", "unseen-drug", "unseen-dose", "unseen-context")
GroupBy = Literal["perturbation", "context", "dose"]
ValidationMode = Literal["holdout", "cv"]  # select on the val conditions, or on grouped folds of train
# The unit each scheme holds out whole: a cell type, a gene/compound (with every dose and context), a dose.
GROUP_BY: dict[str, GroupBy] = {"unseen-perturbation": "perturbation", "combo": "perturbation",
                                "unseen-drug": "perturbation", "unseen-dose": "dose", "unseen-context": "context"}
PARTS = ("train", "val_inputs", "val_truth", "test_inputs", "test_truth")
# What a model may see (a sandbox's /data): training cells and the inputs of val and test, no truth.
MODEL_FILES = ("train.h5ad", "val_inputs.h5ad", "test_inputs.h5ad")
TRUTH_FILES = ("val_truth.h5ad", "test_truth.h5ad")
SPLIT_FILES = MODEL_FILES + TRUTH_FILES + ("split.json",)
SPLIT_UNS = "split"  # uns of the model-facing parts: {"scheme", "group_by"} (how to hold out for early stopping);
# a cross-validation fold's also "run_contexts" (`write_fold`)
MIN_VAL_CONDITIONS = 10  # a validation fold smaller than this (or than MIN_VAL_GROUPS groups) cannot decide...
# Conditions of one held-out group (a cell type, a gene, a compound) move together: a fold of fewer groups
# measures those groups, not the skill (the verdict's MIN_TEST_GROUPS). It would also keep them out of the
# test model's training, which with a handful of cell types costs more than the selection gains.
MIN_VAL_GROUPS = 5
CV_FOLDS = 3  # ...so selection uses grouped K-fold cross-validation over the training groups
LOO_MAX_CONTEXTS = 8  # up to this many training cell types, one fold per cell type (leave-one-out)
FEATURE_TYPE_NAMES = {"rna": "Gene Expression", "protein": "Antibody Capture", "atac": "Peaks"}


class SplitInfo(BaseModel):
    """The content of `split.json`."""

    version: int = 2
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
    group_by: GroupBy = "perturbation"  # the unit held out whole (see GROUP_BY); folds use it too
    # "holdout": select on the val conditions; "cv": val is empty and `folds` (lists of training conditions,
    # whole groups each) are held out in turn.
    validation: ValidationMode = "holdout"
    folds: list[list[str]] = []


@dataclass
class ConditionAssignment:
    """Where each non-control condition goes, and the category of each held-out one."""

    part: dict[str, str]  # condition -> train | val | test
    categories: dict[str, str] = field(default_factory=dict)
    held_out_context: str | None = None
    validation: ValidationMode = "holdout"
    group_by: GroupBy = "perturbation"
    folds: list[list[str]] = field(default_factory=list)  # cv: training conditions held out in turn


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
    """One context held out for test; whole other contexts for val, only where at least two can go to
    val and two stay in train (fewer: the split falls back to leave-one-context-out folds)."""
    obs = dataset.obs
    with_controls = set(obs.loc[obs[IS_CONTROL], CONTEXT])
    contexts = sorted(set(conds[CONTEXT]) & with_controls)
    if len(set(obs[CONTEXT])) < 2:
        raise SplitError("scheme 'unseen-context' needs 2 or more contexts; "
                         f"context column {dataset.layout.context_key!r} has {preview(set(obs[CONTEXT]))}")
    if context is None:
        if not contexts:
            raise SplitError("no context has both control cells and perturbed cells")
        # Cells without a cell type are no cell type to predict; they are drawn only when nothing else is.
        drawable = [c for c in contexts if c != UNKNOWN_CONTEXT] or contexts
        context = drawable[int(rng.integers(len(drawable)))]
    elif context not in contexts:
        raise SplitError(f"context {context!r} cannot be held out; contexts with controls "
                         f"and perturbations: {preview(contexts)}")
    in_ctx = conds[CONTEXT] == context
    held = _shuffled(conds.loc[in_ctx, CONDITION], rng)
    if few_shot_k >= len(held):
        raise SplitError(f"few_shot_k={few_shot_k} keeps every one of the {len(held)} conditions of context "
                         f"{context!r} in train; expected fewer")
    part = {c: "test" for c in held[few_shot_k:]} | {c: "train" for c in held[:few_shot_k]}
    others = _shuffled([c for c in contexts if c != context], rng)
    n_val = min(max(MIN_VAL_GROUPS, round(val_fraction * len(others))), len(others) - 2) \
        if val_fraction > 0 and len(others) >= 2 * MIN_VAL_GROUPS else 0
    val_contexts = set(others[:n_val])
    for cond, ctx in zip(conds.loc[~in_ctx, CONDITION], conds.loc[~in_ctx, CONTEXT], strict=True):
        part[cond] = "val" if ctx in val_contexts else "train"
    label = "few_shot" if few_shot_k else "zero_shot"
    return ConditionAssignment(part, {c: label for c in held[few_shot_k:]}, held_out_context=context)


def condition_group(group_by: str, perturbation: str, dose: float, context: str) -> str:
    """The group a condition belongs to when held out whole: its context, its perturbation, or its
    perturbation at its dose."""
    if group_by == "context":
        return str(context)
    if group_by == "dose":
        return f"{perturbation}@{'' if pd.isna(dose) else f'{float(dose):g}'}"
    return str(perturbation)


def condition_groups(table: pd.DataFrame, group_by: str) -> list[str]:
    """`condition_group` of every row of a table with perturbation, dose and context columns."""
    return [condition_group(group_by, p, d, c) for p, d, c in
            zip(table[PERTURBATION], table[DOSE].astype(float), table[CONTEXT], strict=True)]


def _cv_folds(conds: pd.DataFrame, train: list[str], scheme: str, k: int, rng,
              held_out_context: str | None = None) -> tuple[GroupBy, list[list[str]]]:
    """Grouped folds over the training conditions: (group_by used, folds of conditions).

    The scheme's unit is held out whole: leave-one-cell-type-out (contexts merged into k folds when there
    are more), whole perturbations, whole doses (each drug loses at most one training dose per fold, so
    the fold asks what the test asks: a dose between or beside doses that were seen), combos (their
    singles stay in every fold's training data). A scheme whose units are too few in train falls back to
    whole perturbations."""
    table = conds.set_index(CONDITION).loc[sorted(train)].reset_index()
    if held_out_context is not None:  # few-shot conditions of the test context are not a fold of their own
        table = table[table[CONTEXT] != held_out_context]
    group_by: GroupBy = GROUP_BY[scheme]
    if scheme == "unseen-dose":
        folds: list[list[str]] = [[] for _ in range(k)]
        for drug in _shuffled(table[PERTURBATION].unique(), rng):
            rows = table[table[PERTURBATION] == drug]
            doses = _shuffled(rows[DOSE].dropna().unique(), rng)
            if len(doses) < 2:
                continue
            offset = int(rng.integers(k))
            for i, dose in enumerate(doses[:k]):
                folds[(offset + i) % k] += list(rows.loc[rows[DOSE] == dose, CONDITION])
        if sum(map(bool, folds)) >= 2:
            return group_by, [sorted(f) for f in folds if f]
        group_by = "perturbation"
    eligible = table
    if scheme == "combo":
        eligible = table[[len(combo_genes(p)) > 1 for p in table[PERTURBATION]]]
    groups = pd.Series(condition_groups(eligible, group_by), index=eligible[CONDITION])
    if groups.nunique() < 2:
        group_by = "perturbation"
        eligible = table
        groups = pd.Series(condition_groups(table, group_by), index=table[CONDITION])
    units = _shuffled(groups.unique(), rng)
    if len(units) < 2:
        return group_by, []
    # Few cell types: leave one out, so each fold trains on all but one, as the test's model does (3-fold
    # over seven trained on four or five, too few to place a cell type among the others by its control
    # state; the validation winner then was not the test's).
    k = len(units) if group_by == "context" and len(units) <= LOO_MAX_CONTEXTS else min(k, len(units))
    sizes = groups.value_counts()
    folds = [[] for _ in range(k)]
    load = [0] * k
    for unit in sorted(units, key=lambda u: -sizes[u]):  # stable: ties keep the seeded order
        i = int(np.argmin(load))
        folds[i] += list(groups.index[groups == unit])
        load[i] += int(sizes[unit])
    return group_by, [sorted(f) for f in folds]


def choose_validation(conds: pd.DataFrame, plan: ConditionAssignment, scheme: str, rng,
                      cv_folds: int = CV_FOLDS) -> tuple[ValidationMode, GroupBy, list[list[str]]]:
    """("holdout", group_by, []) when the val conditions can decide (≥ MIN_VAL_CONDITIONS conditions in
    ≥ MIN_VAL_GROUPS groups); else ("cv", group_by, folds): the val conditions go back to train (in
    `plan.part`) and grouped folds over the training conditions take their place."""
    val = conds[conds[CONDITION].map(plan.part) == "val"]
    group_by = GROUP_BY[scheme]
    if len(val) >= MIN_VAL_CONDITIONS and len(set(condition_groups(val, group_by))) >= MIN_VAL_GROUPS:
        return "holdout", group_by, []
    for cond in val[CONDITION]:
        plan.part[cond] = "train"
        plan.categories.pop(cond, None)
    train = [c for c, p in plan.part.items() if p == "train"]
    if scheme == "combo":  # singles that were val are training singles now: recount what test combos have seen
        perts = conds.set_index(CONDITION)[PERTURBATION]
        seen = {perts[c] for c in train if len(combo_genes(perts[c])) == 1}
        for cond, category in plan.categories.items():
            if category.startswith("seen"):
                plan.categories[cond] = f"seen{min(2, sum(g in seen for g in combo_genes(perts[cond])))}"
    group_by, folds = _cv_folds(conds, train, scheme, cv_folds, rng, plan.held_out_context)
    return "cv", group_by, folds


def assign_conditions(dataset: Dataset, scheme: str, seed: int, *, test_fraction: float = 0.2,
                      val_fraction: float = 0.1, context: str | None = None, few_shot_k: int = 0,
                      cv_folds: int = CV_FOLDS) -> ConditionAssignment:
    """Decide train/val/test per (non-control) condition for `scheme`, reproducibly from `seed`, and
    how validation works (`choose_validation`: the val conditions, or `cv_folds` grouped folds)."""
    if scheme not in SCHEMES:
        raise SplitError(f"unknown split scheme {scheme!r}; expected one of {preview(SCHEMES)}")
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise SplitError(f"fractions test={test_fraction}, val={val_fraction}: expected 0 < test, 0 <= val, sum < 1")
    obs = dataset.obs
    conds = (obs.loc[~obs[IS_CONTROL].to_numpy(), [CONDITION, PERTURBATION, DOSE, CONTEXT]]
             .drop_duplicates(CONDITION).sort_values(CONDITION).reset_index(drop=True))
    if conds.empty:
        raise SplitError(f"{dataset.layout.source}: only control cells; nothing to hold out")
    if cv_folds < 2:
        raise SplitError(f"cv_folds={cv_folds}: expected 2 or more")
    rng = np.random.default_rng(seed)
    try:
        plan = _SCHEME_FUNCTIONS[scheme](dataset, conds, rng, test_fraction=test_fraction, val_fraction=val_fraction,
                                         context=context, few_shot_k=few_shot_k)
    except SplitError as exc:
        raise SplitError(f"{dataset.layout.source}: {exc}") from None
    # Its own stream: the test and val assignment of a seed stay what they were without folds.
    fold_rng = np.random.default_rng([seed, 1])
    plan.validation, plan.group_by, plan.folds = choose_validation(conds, plan, scheme, fold_rng, cv_folds)
    return plan


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


@dataclass
class _TrainingStats:
    rna: MeanVar | None  # log-normalized RNA moments of the training cells (for gene selection)
    idf: np.ndarray | None  # ATAC inverse document frequency of the training cells (for TF-IDF)


def _training_stats(dataset: Dataset, train: np.ndarray, hvg: bool, tfidf: bool) -> _TrainingStats:
    """What is learnt from the training cells before any part is written, in one pass over their chunks."""
    blocks = dataset.feature_block
    rna, peaks = np.flatnonzero(blocks == "rna"), np.flatnonzero(blocks == "atac")
    moments = MeanVar(len(rna)) if hvg else None
    docs = np.zeros(len(peaks))
    n_train = 0
    if hvg or tfidf:
        for start, block in row_chunks(dataset.adata.X):
            rows = np.flatnonzero(train[start:start + block.shape[0]])
            if not rows.size:
                continue
            cells = block[rows]
            n_train += len(rows)
            if moments is not None:
                sub = cells if len(rna) == cells.shape[1] else cells[:, rna]
                moments.add(normalize_log1p(sub, in_place=sp.issparse(sub)) if dataset.layout.rna_is_counts else sub)
            if tfidf:
                docs += document_frequency(cells[:, peaks])
    return _TrainingStats(moments, idf_of(n_train, docs) if tfidf else None)


def _part_obs(dataset: Dataset, mask: np.ndarray) -> pd.DataFrame:
    cols = [c for c in (*STANDARD_OBS_COLUMNS, BATCH) if c in dataset.obs.columns]
    obs = dataset.obs.loc[mask, cols].copy()
    obs[IS_CONTROL] = obs[IS_CONTROL].astype(bool)
    return obs


def _targets_table(dataset: Dataset, obs: pd.DataFrame, masks: dict[str, np.ndarray],
                   name: str) -> dict[str, list[str]]:
    """Equal-length lists `perturbation` and `targets` (`;`-joined) for the perturbations a model-facing
    part concerns: its own cells' for train, the conditions to predict for val/test_inputs (an input,
    like the name). Lists, not a dict keyed by perturbation: h5ad would nest a key holding '/'."""
    cells = masks[name.replace("inputs", "truth")]
    perts = sorted(set(obs.loc[cells & ~obs[IS_CONTROL].to_numpy(dtype=bool), PERTURBATION]))
    perts = [p for p in perts if p in dataset.annotations]
    return {PERTURBATION: perts, "targets": [";".join(dataset.annotations[p]) for p in perts]}


def predict_table(cells: pd.DataFrame) -> dict[str, list]:
    """`uns["predict"]` of an inputs part: equal-length lists naming each condition of `cells` (obs rows)."""
    predict = cells[[CONDITION, PERTURBATION, DOSE, CONTEXT]].drop_duplicates(CONDITION).sort_values(CONDITION)
    return {CONDITION: predict[CONDITION].astype(str).tolist(),
            PERTURBATION: predict[PERTURBATION].astype(str).tolist(),
            DOSE: predict[DOSE].astype(float).tolist(), CONTEXT: predict[CONTEXT].astype(str).tolist()}


def make_split(data: str | Path | ad.AnnData | Dataset, scheme: str, seed: int, out_dir: str | Path,
               n_genes: int | None = None, *, perturbation_key: str | None = None, control: str | None = None,
               dose_key: str | None = None, context_key: str | None = None, min_cells: int = DEFAULT_MIN_CELLS,
               test_fraction: float = 0.2, val_fraction: float = 0.1, context: str | None = None,
               few_shot_k: int = 0, atac: str = "binarize", backed: bool | None = None, cv_folds: int = CV_FOLDS,
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
                             context=context, few_shot_k=few_shot_k, cv_folds=cv_folds)
    cell_part = obs[CONDITION].map(plan.part).to_numpy(dtype=object)
    is_ctrl = obs[IS_CONTROL].to_numpy(dtype=bool)
    cell_part[is_ctrl] = "train"
    masks = {"train": cell_part == "train"}
    for which in ("val", "test"):
        contexts = set(obs.loc[cell_part == which, CONTEXT])
        masks[f"{which}_inputs"] = is_ctrl & obs[CONTEXT].isin(contexts).to_numpy()
        masks[f"{which}_truth"] = cell_part == which
    public = {"scheme": scheme, "group_by": plan.group_by}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = dataset.feature_block
    var_names = dataset.gene_names
    order = block_order(blocks)
    n_rna = int((blocks == "rna").sum())
    peaks = np.flatnonzero(blocks == "atac")
    select = n_genes is not None and n_genes < n_rna
    keep_perturbed: set[str] = set()
    if select:
        keep_perturbed = {g for p in obs.loc[masks["train"] | masks["test_truth"] | masks["val_truth"], PERTURBATION]
                          .unique() for g in combo_genes(p)}
        keep_perturbed |= {g for genes in dataset.annotations.values() for g in genes}
    progress("reading training cells")
    # Gene selection and the ATAC idf come from training cells only: a first pass over their chunks.
    stats = _training_stats(dataset, masks["train"], hvg=select, tfidf=atac == "tfidf" and bool(peaks.size))
    selected = np.arange(len(order))
    if select and stats.rna is not None and n_genes is not None:
        mean, var = stats.rna.result()
        hvg = select_variable_genes(mean, var, var_names[order[:n_rna]], n_genes, keep=keep_perturbed)
        selected = np.concatenate([hvg, np.arange(n_rna, len(order))])
    idf = stats.idf
    feature_counts = pd.Series(blocks[order[selected]]).map(FEATURE_TYPE_NAMES).value_counts().to_dict()
    multimodal = len(set(blocks[blocks != "other"])) > 1
    var = pd.DataFrame(index=pd.Index(var_names[order[selected]], dtype=str))
    if layout.gene_symbols_key is not None:
        var["gene_id"] = dataset.adata.var_names[order[selected]].to_numpy()
    if multimodal:
        var["feature_types"] = pd.Series(blocks[order[selected]]).map(FEATURE_TYPE_NAMES).to_numpy()

    parts: dict[Path, Part] = {}
    for name in PARTS:
        uns: dict = {}
        if name.endswith("_inputs"):
            uns["predict"] = predict_table(obs.loc[masks[name.replace("inputs", "truth")]])
        if not name.endswith("_truth"):
            uns[SPLIT_UNS] = dict(public)
            if dataset.annotations:
                uns[TARGETS_UNS] = _targets_table(dataset, obs, masks, name)
        parts[out / f"{name}.h5ad"] = Part(masks[name], _part_obs(dataset, masks[name]), var.copy(), uns)

    def transform(rows):
        # Every transform is per cell (given the training idf), so a chunk transforms like the whole.
        X, _ = transform_blocks(rows, blocks, layout.rna_is_counts, atac, idf, in_place=sp.issparse(rows))
        return X if len(selected) == X.shape[1] else X[:, selected]

    progress("writing " + ", ".join(f"{name}.h5ad" for name in PARTS))
    write_parts(dataset.adata.X, parts, transform)

    genes = [str(g) for g in var_names[order[selected]]]
    info = SplitInfo(
        scheme=scheme, seed=seed, source=layout.source, perturbation_key=layout.perturbation_key,
        control_label=layout.control_labels[0], control_labels=layout.control_labels, dose_key=layout.dose_key,
        context_key=layout.context_key, annotation_key=layout.annotation_key, kind=layout.kind,
        modalities=list(layout.modalities),
        conditions={p: sorted(c for c, q in plan.part.items() if q == p) for p in ("train", "val", "test")},
        n_cells={name: int(m.sum()) for name, m in masks.items()}, genes=genes, categories=plan.categories,
        held_out_context=plan.held_out_context, few_shot_k=few_shot_k, feature_types=feature_counts,
        atac_transform=atac if peaks.size else None, group_by=plan.group_by, validation=plan.validation,
        folds=plan.folds,
    )
    (out / "split.json").write_text(json.dumps(info.model_dump(), indent=1))
    return info


@dataclass
class Split:
    """A split directory; the parts are read on first access. A folder holding only the model files (what
    a sandbox sees) opens too: its truth parts raise a clear error when asked for."""

    path: Path
    info: SplitInfo

    def _read(self, name: str) -> ad.AnnData:
        file = self.path / f"{name}.h5ad"
        if not file.is_file():
            raise SplitDirectoryError(f"{file}: missing (a folder of model inputs holds no truth; the split "
                                      f"directory that does is kept by the service)")
        # A split directory may come from anyone (`cellforge baselines --split`): the checked opener.
        # Backed (X on disk, read a row chunk at a time) when the file is large: see `read_h5ad`.
        return read_h5ad(file)

    @cached_property
    def train(self) -> ad.AnnData:
        return self._read("train")

    @cached_property
    def val_inputs(self) -> ad.AnnData:
        return self._read("val_inputs")

    @cached_property
    def val_truth(self) -> ad.AnnData:
        return self._read("val_truth")

    @cached_property
    def test_inputs(self) -> ad.AnnData:
        return self._read("test_inputs")

    @cached_property
    def test_truth(self) -> ad.AnnData:
        return self._read("test_truth")

    def inputs(self, which: str) -> ad.AnnData:
        """`val_inputs` or `test_inputs`: control cells of the contexts to predict + `uns["predict"]`."""
        return self.val_inputs if which == "val" else self.test_inputs

    def truth(self, which: str) -> ad.AnnData:
        return self.val_truth if which == "val" else self.test_truth

    def predict_of(self, which: str) -> pd.DataFrame:
        """The `which` conditions to predict (from `uns["predict"]` of its inputs part)."""
        return predict_frame(self.inputs(which).uns, str(self.path / f"{which}_inputs.h5ad"))

    @property
    def predict(self) -> pd.DataFrame:
        """The test conditions to predict (from `test_inputs.uns["predict"]`)."""
        return self.predict_of("test")


def perturbation_targets(split: Split) -> dict[str, list[str]]:
    """The annotation table of the model-facing parts merged (train, val_inputs, test_inputs): perturbation ->
    target genes / pathways; empty when the data has no annotation column."""
    out: dict[str, list[str]] = {}
    if split.info.annotation_key is None:
        return out
    for part in (split.train, split.val_inputs, split.test_inputs):
        out.update(targets_of_part(part.uns))
    return out


def load_split(split_dir: str | Path) -> Split:
    """Open a split directory written by `make_split`; checks the model files exist and split.json parses
    (truth files are checked when read: the evaluator needs them, baselines do not)."""
    path = Path(split_dir)
    if (path / "val.h5ad").is_file() and not (path / "val_inputs.h5ad").is_file():
        raise SplitDirectoryError(
            f"{path}: a split written by an older CellForge (val.h5ad holds the validation cells, truth included, "
            f"which would reach a sandbox); split the data again with `cellforge data split` to get "
            f"val_inputs.h5ad + val_truth.h5ad")
    required = MODEL_FILES + ("split.json",)
    missing = [f for f in required if not (path / f).is_file()]
    if missing:
        raise SplitDirectoryError(f"{path}: not a complete split directory; missing {preview(missing)} "
                                  f"(expected {preview(SPLIT_FILES)})")
    try:
        info = SplitInfo.model_validate_json((path / "split.json").read_text())
    except (ValidationError, ValueError) as exc:
        raise SplitDirectoryError(f"{path / 'split.json'}: malformed ({exc})") from exc
    return Split(path, info)


def write_fold(split: Split, fold: int, out_dir: str | Path) -> Split:
    """Fold `fold` of a cv split as a split directory of its own: train = the split's training cells
    without the fold's conditions, val_inputs / val_truth = the fold's conditions (their contexts'
    controls as inputs), test_inputs = the split's. No test truth: a fold only selects."""
    info = split.info
    if not 0 <= fold < len(info.folds):
        raise SplitError(f"{split.path}: fold {fold} does not exist; the split has {len(info.folds)} fold(s)")
    held = set(info.folds[fold])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = split.train
    conditions = train.obs[CONDITION].astype(str).to_numpy()
    is_ctrl = train.obs[IS_CONTROL].to_numpy(dtype=bool)
    in_fold = np.isin(conditions, list(held)) & ~is_ctrl
    contexts = set(train.obs.loc[in_fold, CONTEXT].astype(str))
    masks = {"train": ~in_fold, "val_truth": in_fold,
             "val_inputs": is_ctrl & train.obs[CONTEXT].astype(str).isin(contexts).to_numpy()}
    obs = {name: train.obs.loc[mask].copy() for name, mask in masks.items()}
    uns: dict[str, dict] = {"train": {}, "val_truth": {}, "val_inputs": {"predict": predict_table(obs["val_truth"])}}
    targets = perturbation_targets(split)
    # How many contexts the run's test model trains on: a fold trains on fewer, and a model whose recipe depends
    # on that count fits the test model's recipe where it can, so validation scores what the test model does.
    run_contexts = len(set(train.obs.loc[~is_ctrl, CONTEXT].astype(str)))
    for name in ("train", "val_inputs"):
        uns[name][SPLIT_UNS] = {"scheme": info.scheme, "group_by": info.group_by, "run_contexts": run_contexts}
        if info.annotation_key is not None:
            source = obs["val_truth"] if name == "val_inputs" else obs[name]
            perts = sorted(p for p in set(source.loc[~source[IS_CONTROL].to_numpy(dtype=bool), PERTURBATION]
                                          .astype(str)) if p in targets)
            uns[name][TARGETS_UNS] = {PERTURBATION: perts, "targets": [";".join(targets[p]) for p in perts]}
    write_parts(train.X, {out / f"{name}.h5ad": Part(mask, obs[name], train.var.copy(), uns[name])
                          for name, mask in masks.items()})
    target = out / "test_inputs.h5ad"
    if target.exists():
        target.unlink()
    try:
        os.link(split.path / "test_inputs.h5ad", target)
    except OSError:
        shutil.copy2(split.path / "test_inputs.h5ad", target)
    fold_info = info.model_copy(update={
        "conditions": {"train": sorted(set(info.conditions["train"]) - held), "val": sorted(held),
                       "test": info.conditions["test"]},
        "n_cells": {"train": len(obs["train"]), "val_inputs": len(obs["val_inputs"]),
                    "val_truth": len(obs["val_truth"]), "test_inputs": info.n_cells.get("test_inputs", 0)},
        "validation": "holdout", "folds": [], "source": f"{info.source} (fold {fold + 1}/{len(info.folds)})"})
    (out / "split.json").write_text(json.dumps(fold_info.model_dump(), indent=1))
    return load_split(out)
