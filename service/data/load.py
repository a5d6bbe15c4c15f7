"""Open a perturbation `.h5ad`, detect how it is laid out, and check it is usable.

Detection works on column names and on the distinct labels of the perturbation column (never per
cell), and the matrix checks run on the sparse data arrays or on row chunks, so a 50k x 5k dataset
is checked in seconds and a backed (on-disk) dataset is never densified.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel

from .chunks import row_chunks
from .conditions import (
    BATCH,
    COMBO_SEPARATOR,
    CONDITION,
    CONTEXT,
    CONTROL,
    DOSE,
    IS_CONTROL,
    NO_CONTEXT,
    PERTURBATION,
    condition_keys,
)
from .errors import (
    DataError,
    DataFileError,
    DataTooLarge,
    DuplicateGeneNames,
    InconsistentAnnotation,
    InvalidDose,
    MissingLabels,
    NegativeCounts,
    NoControlCells,
    NonFiniteValues,
    PerturbationColumnNotFound,
    TooFewCells,
    UnknownColumn,
    UnknownPerturbationKey,
    UnsafeDataFile,
    preview,
)
from .h5safety import ENV_PREFIX, H5Limits, open_checked, same_file, size_text

Kind = Literal["genetic", "genetic_combo", "chemical", "cytokine"]
Modality = Literal["rna_counts", "rna_lognorm", "protein", "atac"]

# Column names are compared after lower-casing and dropping non-alphanumerics ("Cell Type" == "cell_type").
PERTURBATION_COLUMNS = (
    "perturbation", "perturbation_name", "perturbations", "pert", "condition", "gene", "genes",
    "target", "target_gene", "gene_target", "targets", "guide_identity", "guide_ids", "sgrna",
    "treatment", "drug", "compound", "perturbagen", "product_name", "stimulation", "stim",
    "cytokine", "ligand",
)
_PERTURBATION_NORMS = frozenset(re.sub(r"[^0-9a-z]", "", n) for n in PERTURBATION_COLUMNS)
DOSE_COLUMNS = ("dose", "dose_value", "dosage", "concentration", "dose_um", "dose_nm", "conc", "dose_val",
                "drugname_drugconc")  # Tahoe-100M: "[('Talc', 0.05, 'uM')]"
CONTEXT_COLUMNS = (
    "cell_type", "celltype", "cell_line", "cellline", "cell_line_name", "cell_type_annotation",
    "context", "cell_context", "tissue",
)
# Names that hold a cell type in well-known datasets (`cell`: the Kang et al. PBMC interferon-β set, GSE96583) but
# could hold something else: taken only as text with 2 to MAX_LIKELY_CONTEXTS values, never as cell barcodes.
GUARDED_CONTEXT_COLUMNS = ("cell",)
# Words in an obs column name that suggest a cell type or context under a name detection does not know
# (`leiden_celltype`, `cell_type_fine`, `louvain`): such a column is pointed out, never silently pooled.
CONTEXT_HINTS = ("celltype", "cellline", "context", "tissue", "leiden", "louvain", "cluster")
MAX_LIKELY_CONTEXTS = 200
POOLED = "none"  # context_key: the data has no context column worth using; pool every cell
UNKNOWN_CONTEXT = "unknown"  # the context of a cell whose context column is empty (a doublet, an unannotated cell)
# Per-perturbation annotations (what a compound targets, as sci-Plex / Tahoe-style screens ship them; a stimulus's
# receptors, through which the base for unseen cell types reads how strongly each type responds).
ANNOTATION_COLUMNS = ("targets", "target", "target_genes", "target_gene", "gene_targets", "receptors", "receptor",
                      "pathway", "pathways")
ANNOTATION_SEPARATORS = re.compile(r"[;,|]")
BATCH_COLUMNS = ("batch", "gem_group", "gemgroup", "plate", "replicate", "library", "sample", "donor", "donor_id",
                 "individual")
# Where gene symbols live when var_names are Ensembl ids (GEARS: gene_name; CELLxGENE: feature_name).
SYMBOL_COLUMNS = ("gene_name", "gene_names", "gene_symbol", "gene_symbols", "symbol", "feature_name", "gene")
_ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}")
FEATURE_TYPE_COLUMNS = ("feature_types", "feature_type", "modality")

# A control label that also says the screen's kind (a vehicle: drugs; an unstimulated well: cytokines).
_CHEMICAL_CONTROLS = frozenset({"dmso", "vehicle", "untreated", "dmsotf", "vehiclecontrol", "nodrug"})  # dmsotf: Tahoe
_CYTOKINE_CONTROLS = frozenset({"unstimulated", "unstim", "pbs"})
# Control labels, normalized (lower-case, alphanumerics only, trailing guide numbers dropped).
CONTROL_LABELS = frozenset({
    "control", "ctrl", "ctl", "nontargeting", "nontarget", "nt", "ntc", "negctrl", "negativecontrol",
    "safetargeting", "scramble", "scrambled", "unperturbed", "mock",
}) | _CHEMICAL_CONTROLS | _CYTOKINE_CONTROLS
_CYTOKINE_COLUMNS = frozenset({"cytokine", "stimulation", "stim", "ligand"})
# Stimulation screens label conditions by the cytokine itself; a genetic screen rarely targets mostly these.
CYTOKINES = frozenset({
    "ifng", "ifnb", "ifnb1", "ifna", "ifna1", "ifna2", "ifnl1", "tnf", "tnfa", "lta", "il1a", "il1b", "il2", "il3",
    "il4", "il5", "il6", "il7", "il9", "il10", "il11", "il12", "il13", "il15", "il17a", "il17f", "il18", "il21",
    "il22", "il23", "il25", "il27", "il33", "il35", "tgfb", "tgfb1", "tgfb2", "csf1", "csf2", "csf3", "gmcsf",
    "gcsf", "mcsf", "tslp", "osm", "lif", "cntf", "epo", "tpo", "flt3l", "cd40l", "rankl", "tweak", "april",
    "baff", "light", "trail", "fasl",
    # A stimulation set's own words for its one stimulus (Kang et al.'s interferon-β: `stim`, `stimulated`).
    "stim", "stimulated", "stimulation", "interferon", "ifn", "ifnbeta", "ifngamma", "ifnalpha", "lps",
})
_CHEMICAL_COLUMNS = frozenset({"drug", "compound", "treatment", "perturbagen", "productname"})

FEATURE_TYPES = {"gene expression": "rna", "antibody capture": "protein", "protein": "protein",
                 "adt": "protein", "peaks": "atac", "atac": "atac", "chromatin accessibility": "atac"}

DEFAULT_MIN_CELLS = 5
LOGNORM_MAX = 30.0
# Above this size (of the file, or of its X uncompressed) a dataset is opened backed (X stays on disk, read a
# row chunk at a time), so the memory of profiling, splitting, baselines and scoring is set by the chunk, not
# by the number of cells.
BACKED_ABOVE_BYTES = 256 << 20
_SAMPLE_ROWS = 2_000


class DatasetLayout(BaseModel):
    """What detection found: which columns mean what, and what kind of data this is."""

    source: str
    n_cells: int
    n_features: int
    perturbation_key: str
    control_labels: list[str]
    dose_key: str | None = None
    context_key: str | None = None
    batch_key: str | None = None
    annotation_key: str | None = None  # obs column of per-perturbation target genes / pathways
    # No context column detected: obs columns whose name and values look like one (see CONTEXT_HINTS).
    context_candidates: list[str] = []
    feature_types_key: str | None = None
    gene_symbols_key: str | None = None  # var column used as gene names (var_names are Ensembl ids)
    kind: Kind
    modalities: list[Modality]
    rna_is_counts: bool
    backed: bool = False


@dataclass
class Dataset:
    """An opened dataset: the AnnData (maybe backed), its layout and the standard obs columns."""

    adata: ad.AnnData
    layout: DatasetLayout
    obs: pd.DataFrame
    feature_block: np.ndarray = field(repr=False)  # per var: "rna" | "protein" | "atac" | "other"
    gene_names: pd.Index = field(repr=False)  # per var: symbols when var_names are Ensembl ids, else var_names
    # perturbation -> annotated target genes / pathways (from layout.annotation_key); empty when none
    annotations: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @property
    def rna_mask(self) -> np.ndarray:
        return self.feature_block == "rna"


def _annotation_column(obs: pd.DataFrame, kind: str, taken: set[str | None]) -> str | None:
    """The annotation column, for drugs and cytokines only: a genetic perturbation is its own target."""
    if kind in ("genetic", "genetic_combo"):
        return None
    col = _find_column([c for c in obs.columns if c not in taken], ANNOTATION_COLUMNS)
    return col if col is not None and _is_text(obs[col]) else None


def split_annotation(value: object) -> list[str]:
    """`"G1; G2"` -> ["G1", "G2"]; empty / NaN -> []."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return []
    return [t.strip() for t in ANNOTATION_SEPARATORS.split(str(value)) if t.strip()]


def _annotations(obs: pd.DataFrame, key: str, labels: np.ndarray, is_ctrl: np.ndarray,
                 source: str) -> dict[str, list[str]]:
    """perturbation -> its annotation, read per distinct (label, value) pair; every cell of a
    perturbation must agree (cells left blank defer to the others)."""
    pairs = pd.DataFrame({"p": labels[~is_ctrl], "v": obs[key].astype(object).to_numpy()[~is_ctrl]})
    out: dict[str, list[str]] = {}
    for (pert, value), _ in pairs.groupby(["p", "v"], dropna=False, sort=True):
        genes = split_annotation(value)
        if not genes:
            continue
        if pert in out and sorted(out[pert]) != sorted(genes):
            raise InconsistentAnnotation(
                f"{source}: perturbation {pert!r} has different values in annotation column {key!r}: "
                f"{';'.join(out[pert])!r} and {';'.join(genes)!r}; expected one annotation per perturbation")
        out[pert] = genes
    return out


def _norm(name: object) -> str:
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def is_control_label(label: object) -> bool:
    """True for the usual control spellings, case-insensitive, guide numbers allowed (`non-targeting_0042`)."""
    n = _norm(label)
    return n in CONTROL_LABELS or n.rstrip("0123456789") in CONTROL_LABELS


def _find_column(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    by_norm: dict[str, str] = {}
    for c in columns:
        by_norm.setdefault(_norm(c), c)
    for cand in candidates:
        if _norm(cand) in by_norm:
            return by_norm[_norm(cand)]
    return None


def _context_like(col: pd.Series) -> bool:
    """Text with 2 to MAX_LIKELY_CONTEXTS values, most shared by several cells (not an identifier)."""
    return _is_text(col) and 2 <= col.nunique() <= min(MAX_LIKELY_CONTEXTS, len(col) // 2)


def likely_context_columns(obs: pd.DataFrame, taken: set[str | None]) -> list[str]:
    """Text columns named like a cell type / context (CONTEXT_HINTS) that look like one (`_context_like`)."""
    return [str(c) for c in obs.columns if c not in taken and any(h in _norm(c) for h in CONTEXT_HINTS)
            and _context_like(obs[c])]


def _check_key(obs: pd.DataFrame, key: str | None, what: str) -> str | None:
    if key is not None and key not in obs.columns:
        raise UnknownColumn(f"{what} column {key!r} is not in obs; obs columns are: {preview(obs.columns, 40)}")
    return key


def read_h5ad(path: str | Path, backed: bool | None = None, limits: H5Limits | None = None) -> ad.AnnData:
    """Open an `.h5ad` nobody vouches for: refused (UnsafeDataFile, DataTooLarge) when it reaches outside
    itself, is not a regular file, or breaks `limits` (default: `H5Limits.from_env()`), all checked on
    its HDF5 structure before any data is read. Backed (read-only, on disk) when asked, or when the file or
    its X (uncompressed) exceeds `BACKED_ABOVE_BYTES` (256 MiB), or it declares more than
    `limits.max_memory_bytes`."""
    p = Path(path)
    limits = limits or H5Limits.from_env()
    f, inventory = open_checked(p, limits)
    try:
        missing = [k for k in ("obs", "var") if k not in f]
        if missing:
            raise DataFileError(f"{p}: HDF5 file without the AnnData group(s) {missing}; expected an .h5ad file")
        if backed is None:
            backed = max(inventory.file_bytes, inventory.backed_bytes) > BACKED_ABOVE_BYTES or \
                inventory.declared_bytes > limits.max_memory_bytes
        needed = inventory.memory_bytes(backed)
        if needed > limits.max_memory_bytes:
            raise DataTooLarge(
                f"{p}: reading it {'backed (X on disk)' if backed else 'into memory'} needs {size_text(needed)}, "
                f"beyond the limit of {size_text(limits.max_memory_bytes)} (largest datasets: "
                f"{', '.join(f'{k} {size_text(n)}' for k, n in inventory.largest)}); "
                f"set {ENV_PREFIX}MAX_MEMORY_BYTES to raise it")
        if not backed:
            return _narrow_index(ad.read_h5ad(f.id))  # through the checked handle, never a second open by name
        f.close()
        adata = ad.read_h5ad(p, backed="r")
        try:
            same_file(adata.file._file, inventory, p)
        except UnsafeDataFile:
            adata.file.close()
            raise
        return adata
    except (DataError, MemoryError):
        raise
    except Exception as exc:  # anndata raises many types on corrupt files; surface one clear error
        raise DataFileError(f"{p}: cannot be read as AnnData ({type(exc).__name__}: {exc})") from exc
    finally:
        f.close()


def _narrow_index(adata: ad.AnnData) -> ad.AnnData:
    """A sparse X read into memory with int64 `indptr` (as the part writer stores it) and int32 `indices`
    gets an int32 `indptr` when its values fit: scipy otherwise copies `indices` to int64 on every row
    selection (`X[rows]`), the whole matrix each time (measured: most of the evaluator's DE setup)."""
    X = adata.X
    if sp.issparse(X) and X.format in ("csr", "csc") and X.indptr.dtype != np.int32 \
            and X.indices.dtype == np.int32 and X.nnz < np.iinfo(np.int32).max:
        X.indptr = X.indptr.astype(np.int32)
    return adata


def _values(block) -> np.ndarray:
    """The stored values of a block (sparse: only the non-zeros)."""
    return block.data if sp.issparse(block) else np.asarray(block)


def _first_entry(block, bad, columns: np.ndarray | None = None) -> tuple[int, int, float]:
    """(row, col, value) of the first stored entry where `bad(value)` holds, without densifying a sparse block."""
    if sp.issparse(block):
        csr = sp.csr_matrix(block)
        hits = bad(csr.data)
        if columns is not None:
            hits &= columns[csr.indices]
        i = int(np.flatnonzero(hits)[0])
        return int(np.searchsorted(csr.indptr, i, side="right") - 1), int(csr.indices[i]), float(csr.data[i])
    dense = np.asarray(block)
    hits = bad(dense)
    if columns is not None:
        hits &= columns[None, :]
    row, col = (int(i[0]) for i in np.nonzero(hits))
    return row, col, float(dense[row, col])


def _gene_names(adata: ad.AnnData) -> tuple[str | None, pd.Index]:
    """Gene symbols when var_names are Ensembl ids and var has a symbol column, since perturbation
    labels name genes by symbol; otherwise var_names. Duplicate symbols get anndata's `-1` suffixes."""
    names = adata.var_names
    if not len(names) or names.str.match(_ENSEMBL_ID).mean() < 0.5:
        return None, names
    key = _find_column(list(adata.var.columns), SYMBOL_COLUMNS)
    if key is None:
        return None, names
    col = adata.var[key].astype(object)
    symbols = col.where(col.notna() & (col.astype(str).str.strip() != ""), pd.Series(names, index=col.index))
    return key, ad.utils.make_index_unique(pd.Index(symbols.astype(str).to_numpy()))


def _detect_feature_blocks(adata: ad.AnnData) -> tuple[str | None, np.ndarray]:
    key = _find_column(list(adata.var.columns), FEATURE_TYPE_COLUMNS)
    if key is None:
        return None, np.full(adata.n_vars, "rna", dtype=object)
    types = adata.var[key].astype(str).str.strip().str.lower()
    return key, types.map(FEATURE_TYPES).fillna("other").to_numpy(dtype=object)


def _rna_is_counts(adata: ad.AnnData, rna_mask: np.ndarray) -> bool:
    """Counts = integer-valued and non-negative on a sample of rows of the RNA block."""
    if not rna_mask.any():
        return False
    n = min(adata.n_obs, _SAMPLE_ROWS)
    block = adata.X[:n]
    if rna_mask.all():
        vals = _values(block)
    elif sp.issparse(block):
        block = sp.csr_matrix(block)
        vals = block.data[rna_mask[block.indices]]
    else:
        vals = np.asarray(block)[:, rna_mask]
    vals = np.asarray(vals, dtype=np.float64).ravel()
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return True
    integral = bool((vals >= 0).all() and (vals == np.round(vals)).all())
    # log1p of counts per 10k never exceeds ~10; larger non-integer values are corrected/scaled counts.
    return integral or float(vals.max()) > LOGNORM_MAX


def _underscore_combos(labels: list[str]) -> set[str]:
    """The labels that write a combination `A_B`, as scPerturb does (`CEBPE_RUNX1T1`): taken so when at least
    half of the column's labels with `_` (and no `+`) split into parts that are themselves labels there or
    controls; guide names (`TP53_sg1`) and symbols with an underscore do not."""
    known = set(labels)
    candidates = [lab for lab in labels if "_" in lab and COMBO_SEPARATOR not in lab]
    resolved = [lab for lab in candidates if all(p in known or is_control_label(p) for p in lab.split("_"))]
    return set(candidates) if candidates and 2 * len(resolved) >= len(candidates) else set()


def _standard_labels(raw: pd.Series, control_labels: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Map the raw perturbation labels to standard ones, per distinct label then broadcast to cells.

    Controls become `control`; GEARS-style `A+ctrl` becomes `A`; combinations are sorted (`B+A` -> `A+B`).
    """
    codes, uniques = pd.factorize(raw.astype(str), sort=False)
    underscored = _underscore_combos([u for u in uniques if u not in control_labels])
    mapped = []
    for label in uniques:
        if label in control_labels:
            mapped.append(CONTROL)
            continue
        # "|" separates the fields of a condition key, so it cannot appear inside a label.
        parts = [p.strip().replace("|", "/")
                 for p in (label.split("_") if label in underscored else label.split(COMBO_SEPARATOR))]
        kept = sorted({p for p in parts if p and not is_control_label(p)})
        mapped.append(COMBO_SEPARATOR.join(kept) if kept else CONTROL)
    labels = np.asarray(mapped, dtype=object)[codes]
    return labels, labels == CONTROL


_NUMBER = r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?"


def _parse_dose(obs: pd.DataFrame, key: str, source: str) -> np.ndarray:
    col = obs[key]
    dose = pd.to_numeric(col, errors="coerce")
    if not dose.isna().any():
        return dose.to_numpy(dtype=float)
    # Accept unit suffixes such as "10uM" or "0.1 nM" (the number is kept, the unit is assumed shared).
    text = col.astype(str)
    extracted = text.str.extract(rf"^\s*({_NUMBER})")[0]
    dose = dose.fillna(pd.to_numeric(extracted, errors="coerce"))
    # Tahoe-100M writes (drug, concentration, unit) tuples: "[('Talc', 0.05, 'uM')]".
    in_tuple = text.str.extract(rf"^\[\(\s*'[^']*'\s*,\s*({_NUMBER})\s*,\s*'[^']*'\s*\)\]$")[0]
    dose = dose.fillna(pd.to_numeric(in_tuple, errors="coerce"))
    bad = col.notna() & dose.isna() & ~text.str.strip().str.lower().isin({"", "nan", "none"})
    if bad.any():
        raise InvalidDose(f"{source}: dose column {key!r} holds non-numeric values "
                          f"{preview(pd.unique(col[bad].astype(str)))}; expected numbers (e.g. 0.1, 10, '10uM')")
    return dose.to_numpy(dtype=float)


def _is_text(col: pd.Series) -> bool:
    return isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_object_dtype(col) or \
        pd.api.types.is_string_dtype(col)


def _pick_perturbation_column(obs: pd.DataFrame, key: str | None, control: str | None,
                              source: str) -> tuple[str, list[str]]:
    if key is not None:
        if key not in obs.columns:
            raise UnknownPerturbationKey(f"{source}: --perturbation-key {key!r} is not an obs column; "
                                         f"obs columns are: {preview(obs.columns, 40)}")
        candidates = [key]
    else:
        by_norm = {_norm(c): c for c in reversed(list(obs.columns))}
        candidates = [by_norm[_norm(n)] for n in PERTURBATION_COLUMNS if _norm(n) in by_norm]
        # Then any other text column: a column holding a control label is very likely the perturbation.
        candidates += [c for c in obs.columns if _is_text(obs[c]) and c not in candidates]
        candidates = list(dict.fromkeys(candidates))
        if not candidates:
            raise PerturbationColumnNotFound(
                f"{source}: no perturbation column found; obs columns are: {preview(obs.columns, 40)}; "
                f"expected one of {preview(PERTURBATION_COLUMNS, 40)} or pass --perturbation-key")
    seen: dict[str, list[str]] = {}
    for col in candidates:
        values = obs[col]
        labels = [str(v) for v in pd.unique(values.dropna())]
        seen[col] = labels
        if control is not None:
            found = [lab for lab in labels if lab == control] or [lab for lab in labels if lab.lower() == control.lower()]
        else:
            found = [lab for lab in labels if is_control_label(lab)]
        if found:
            return col, found
    named = [c for c in candidates if _norm(c) in _PERTURBATION_NORMS]
    guess = named[0] if named else key
    if guess is None:
        raise PerturbationColumnNotFound(
            f"{source}: no perturbation column found and no obs column holds a control label; obs columns are: "
            f"{preview(obs.columns, 40)}; expected one of {preview(PERTURBATION_COLUMNS, 40)} or pass "
            "--perturbation-key (and --control)")
    if control is not None:
        wanted, hint = repr(control), ""
    else:
        wanted = "a control label (control, ctrl, non-targeting, NT, DMSO, vehicle, unstimulated, PBS, ...)"
        hint = "; pass --control LABEL if the control is spelled otherwise"
    raise NoControlCells(f"{source}: no control cells in perturbation column {guess!r}: expected {wanted}; "
                         f"labels seen: {preview(seen[guess], 20)}{hint}")


def _detect_kind(pert_key: str, controls: list[str], dose_key: str | None, labels: np.ndarray) -> Kind:
    key = _norm(pert_key)
    ctrl = {_norm(c).rstrip("0123456789") for c in controls}
    perts = [p for p in pd.unique(labels) if p != CONTROL]
    named_cytokines = sum(all(_norm(g) in CYTOKINES for g in p.split(COMBO_SEPARATOR)) for p in perts)
    if key in _CYTOKINE_COLUMNS or ctrl & _CYTOKINE_CONTROLS or (perts and named_cytokines > len(perts) / 2):
        return "cytokine"
    if dose_key is not None or key in _CHEMICAL_COLUMNS or ctrl & _CHEMICAL_CONTROLS:
        return "chemical"
    if any(COMBO_SEPARATOR in lab for lab in pd.unique(labels)):
        return "genetic_combo"
    return "genetic"


def detect_layout(adata: ad.AnnData, *, source: str = "<AnnData>", perturbation_key: str | None = None,
                  control: str | None = None, dose_key: str | None = None, context_key: str | None = None,
                  batch_key: str | None = None) -> Dataset:
    """Detect the layout and build the standard obs columns (no validation of the values: see `validate`)."""
    if adata.X is None:
        raise DataFileError(f"{source}: X is empty (layers: {preview(adata.layers.keys())}); expected the expression "
                            "matrix in X (raw counts or log-normalized)")
    obs = adata.obs
    pert_key, controls = _pick_perturbation_column(obs, perturbation_key, control, source)
    dose_key = _check_key(obs, dose_key, "dose") or _find_column(list(obs.columns), DOSE_COLUMNS)
    pooled = context_key == POOLED and POOLED not in obs.columns
    guarded = _find_column(list(obs.columns), GUARDED_CONTEXT_COLUMNS)
    context_key = None if pooled else (_check_key(obs, context_key, "context")
                                       or _find_column(list(obs.columns), CONTEXT_COLUMNS)
                                       or (guarded if guarded and _context_like(obs[guarded]) else None))
    batch_key = _check_key(obs, batch_key, "batch") or _find_column(list(obs.columns), BATCH_COLUMNS)
    if pert_key in (dose_key, context_key, batch_key):
        raise UnknownColumn(f"{source}: column {pert_key!r} cannot be both the perturbation and another role")

    raw = obs[pert_key]
    missing = raw.isna() | (raw.astype(str).str.strip() == "")
    if missing.any():
        raise MissingLabels(f"{source}: {int(missing.sum())} cells have no label in perturbation column "
                            f"{pert_key!r} (e.g. cells {preview(obs.index[missing.to_numpy()][:5])}); "
                            "expected a perturbation or control label on every cell")
    labels, is_ctrl = _standard_labels(raw, set(controls))

    dose = _parse_dose(obs, dose_key, source) if dose_key else np.full(adata.n_obs, np.nan)
    dose = np.where(is_ctrl, np.nan, dose)
    if context_key:
        col = obs[context_key].astype(object)
        context = col.where(col.notna(), UNKNOWN_CONTEXT).astype(str).str.replace("|", "/", regex=False).to_numpy(dtype=object)
    else:
        context = np.full(adata.n_obs, NO_CONTEXT, dtype=object)

    std = pd.DataFrame({PERTURBATION: labels, DOSE: dose, CONTEXT: context, IS_CONTROL: is_ctrl},
                       index=obs.index.copy())
    std[CONDITION] = condition_keys(labels, dose, context)
    if batch_key:
        std[BATCH] = obs[batch_key].astype(str).to_numpy()

    ft_key, blocks = _detect_feature_blocks(adata)
    symbols_key, gene_names = _gene_names(adata)
    rna_mask = blocks == "rna"
    counts = _rna_is_counts(adata, rna_mask)
    modalities: list[Modality] = []
    if rna_mask.any():
        modalities.append("rna_counts" if counts else "rna_lognorm")
    if (blocks == "protein").any():
        modalities.append("protein")
    if (blocks == "atac").any():
        modalities.append("atac")
    if not modalities:
        raise DataFileError(f"{source}: var column {ft_key!r} names no known feature type "
                            f"(seen {preview(pd.unique(adata.var[ft_key].astype(str)))}); expected "
                            "'Gene Expression', 'Antibody Capture' or 'Peaks'")

    kind = _detect_kind(pert_key, controls, dose_key, labels)
    annotation_key = _annotation_column(obs, kind, {pert_key, dose_key, context_key, batch_key})
    annotations = _annotations(obs, annotation_key, labels, is_ctrl, source) if annotation_key else {}
    if annotation_key and not annotations:
        annotation_key = None  # a column of blanks annotates nothing
    candidates = ([] if context_key or pooled else
                  likely_context_columns(obs, {pert_key, dose_key, batch_key, annotation_key}))
    layout = DatasetLayout(
        source=source, n_cells=adata.n_obs, n_features=adata.n_vars, perturbation_key=pert_key,
        control_labels=sorted(controls), dose_key=dose_key, context_key=context_key, batch_key=batch_key,
        annotation_key=annotation_key, context_candidates=candidates, feature_types_key=ft_key,
        gene_symbols_key=symbols_key, kind=kind,
        modalities=modalities, rna_is_counts=counts, backed=bool(adata.isbacked),
    )
    return Dataset(adata=adata, layout=layout, obs=std, feature_block=blocks, gene_names=gene_names,
                   annotations=annotations)


# Files whose X values passed `validate` in this process, by identity (path, inode, size, mtime): a design
# profiles and then splits the same file, and each pass over a million cells' values costs a minute.
_VALUES_CHECKED: set[tuple] = set()


def _file_identity(source: str, rna_mask: np.ndarray) -> tuple | None:
    try:
        st = os.stat(source)
    except (OSError, ValueError):
        return None  # not a file (an in-memory AnnData): always checked
    return (os.path.realpath(source), st.st_ino, st.st_size, st.st_mtime_ns, np.packbits(rna_mask).tobytes())


def validate(dataset: Dataset, min_cells: int = DEFAULT_MIN_CELLS) -> None:
    """Raise the specific DataError for the first defect found; pass silently on good data."""
    adata, obs, blocks, source = dataset.adata, dataset.obs, dataset.feature_block, dataset.layout.source
    identity = _file_identity(source, np.asarray(blocks == "rna")) if source != "<AnnData>" else None
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataFileError(f"{source}: empty matrix ({adata.n_obs} cells x {adata.n_vars} features)")
    dup = adata.var_names[adata.var_names.duplicated()]
    if len(dup):
        raise DuplicateGeneNames(f"{source}: {len(dup)} duplicate gene names in var_names, e.g. "
                                 f"{preview(pd.unique(dup), 8)}; expected unique names (anndata: var_names_make_unique())")
    rna_mask = blocks == "rna"
    all_rna = bool(rna_mask.all())
    for start, block in ([] if identity in _VALUES_CHECKED else row_chunks(adata.X)):
        vals = _values(block)
        if not np.isfinite(vals).all():
            n_bad = int((~np.isfinite(vals)).sum())
            row, col, _ = _first_entry(block, lambda v: ~np.isfinite(v))
            raise NonFiniteValues(f"{source}: X holds {n_bad} NaN/inf values (first at cell "
                                  f"{adata.obs_names[start + row]!r}, gene {adata.var_names[col]!r}); "
                                  "expected finite values")
        if all_rna:
            negative = vals.min(initial=0) < 0
        elif sp.issparse(block):
            csr = sp.csr_matrix(block)
            negative = bool((csr.data < 0)[rna_mask[csr.indices]].any())
        else:
            negative = bool((np.asarray(block)[:, rna_mask] < 0).any())
        if negative:
            row, col, value = _first_entry(block, lambda v: v < 0, rna_mask)
            raise NegativeCounts(f"{source}: X holds negative expression values (e.g. {value:g} at cell "
                                 f"{adata.obs_names[start + row]!r}, gene {adata.var_names[col]!r}); expected raw "
                                 "counts or log-normalized expression (>= 0), not scaled/centred data")
    if identity is not None:
        _VALUES_CHECKED.add(identity)
    if min_cells > 0:
        sizes = obs.loc[~obs[IS_CONTROL].to_numpy(), CONDITION].value_counts()
        small = sizes[sizes < min_cells]
        if len(small):
            listed = preview([f"{k} ({v} cells)" for k, v in small.sort_values().items()], 10)
            raise TooFewCells(f"{source}: {len(small)} conditions have fewer than {min_cells} cells: {listed}; "
                              "drop them or lower the threshold (--min-cells)")


def load_dataset(data: str | Path | ad.AnnData, *, perturbation_key: str | None = None, control: str | None = None,
                 dose_key: str | None = None, context_key: str | None = None, batch_key: str | None = None,
                 min_cells: int = DEFAULT_MIN_CELLS, backed: bool | None = None, check: bool = True,
                 limits: H5Limits | None = None) -> Dataset:
    """Open (if a path, through `read_h5ad` and its `limits`), detect and validate a perturbation dataset."""
    if isinstance(data, ad.AnnData):
        adata, source = data, "<AnnData>"
    else:
        adata, source = read_h5ad(data, backed=backed, limits=limits), str(data)
    dataset = detect_layout(adata, source=source, perturbation_key=perturbation_key, control=control,
                            dose_key=dose_key, context_key=context_key, batch_key=batch_key)
    if check:
        validate(dataset, min_cells=min_cells)
    return dataset
