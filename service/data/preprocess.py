"""Normalization per modality, highly variable genes, pseudobulk means.

All functions take a dense ndarray or any scipy sparse matrix and keep sparse input sparse; they are
vectorised over the stored values (no per-cell Python loop) so they scale to 50k+ cells.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

TARGET_SUM = 1e4
NORMALIZATION = "log1p_cp10k"


def _row_sums(X) -> np.ndarray:
    return np.asarray(X.sum(axis=1), dtype=np.float64).ravel()


_SCALE_BLOCK = 1 << 22  # stored values scaled per step: bounds the temporary a row-wise product needs


def _scale_rows(X, factors: np.ndarray, in_place: bool = False):
    """X with row i multiplied by factors[i], as float32; sparse stays CSR.

    With `in_place` (the caller owns X, e.g. a fresh row subset) a float32 CSR is scaled in its own
    buffer; otherwise the result shares nothing with X.
    """
    factors = factors.astype(np.float32)
    if not sp.issparse(X):
        if in_place and isinstance(X, np.ndarray) and X.dtype == np.float32:
            X *= factors[:, None]
            return X
        return np.asarray(X, dtype=np.float32) * factors[:, None]
    csr = X.tocsr()
    if in_place and csr.data.dtype == np.float32:
        out = csr
    else:
        out = sp.csr_matrix((csr.data.astype(np.float32), csr.indices.copy(), csr.indptr.copy()), shape=csr.shape)
    indptr, data = out.indptr, out.data
    row = 0
    while row < out.shape[0]:
        end = int(np.searchsorted(indptr, indptr[row] + _SCALE_BLOCK, side="right")) - 1
        end = min(max(end, row + 1), out.shape[0])
        lo, hi = indptr[row], indptr[end]
        data[lo:hi] *= np.repeat(factors[row:end], np.diff(indptr[row:end + 1]))
        row = end
    return out


def normalize_log1p(X, target_sum: float = TARGET_SUM, *, in_place: bool = False):
    """`normalize_total(target_sum)` then `log1p` (scanpy's defaults), float32; cells with no counts stay 0.

    `in_place=True` reuses X's buffers when X is float32 (only for a matrix the caller owns).
    """
    totals = _row_sums(X)
    factors = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    out = _scale_rows(X, factors, in_place=in_place)
    if sp.issparse(out):
        np.log1p(out.data, out=out.data)
    else:
        np.log1p(out, out=out)
    return out


def clr(X) -> np.ndarray:
    """Centred log-ratio per cell across proteins: `log1p(x) - mean(log1p(x))` (CITE-seq ADTs); dense."""
    logx = np.log1p(X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64))
    return (logx - logx.mean(axis=1, keepdims=True)).astype(np.float32)


def binarize(X):
    """Peak accessibility as 0/1 (ATAC), float32; sparse stays sparse."""
    if sp.issparse(X):
        out = X.tocsr().astype(np.float32)
        out.data = (out.data > 0).astype(np.float32)
        out.eliminate_zeros()
        return out
    return (np.asarray(X) > 0).astype(np.float32)


def tfidf(X, idf: np.ndarray | None = None, scale: float = TARGET_SUM):
    """TF-IDF for ATAC peaks (Signac's `log1p(tf * idf * 1e4)`); pass the training `idf` to transform other cells."""
    if idf is None:
        idf = inverse_document_frequency(X)
    totals = _row_sums(X)
    tf = _scale_rows(X, np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0))
    if sp.issparse(tf):
        tf = tf.multiply(idf.astype(np.float32)[None, :]).tocsr() * np.float32(scale)
        np.log1p(tf.data, out=tf.data)
        return tf
    return np.log1p(tf * idf.astype(np.float32)[None, :] * np.float32(scale))


def document_frequency(X) -> np.ndarray:
    """Per peak: how many cells (rows) have it open (> 0)."""
    return np.asarray((X > 0).sum(axis=0), dtype=np.float64).ravel()


def idf_of(n_cells: int, document_frequency: np.ndarray) -> np.ndarray:
    return np.log1p(n_cells / (1.0 + document_frequency))


def inverse_document_frequency(X) -> np.ndarray:
    return idf_of(X.shape[0], document_frequency(X))


class MeanVar:
    """Per-gene mean and (population) variance accumulated over row chunks, in float64, without
    densifying or copying a sparse chunk: `add` each chunk, then `result()`."""

    def __init__(self, n_genes: int) -> None:
        self.n = 0
        self.total = np.zeros(n_genes)
        self.total_sq = np.zeros(n_genes)

    def add(self, X) -> MeanVar:
        self.n += X.shape[0]
        if sp.issparse(X):
            csr = X.tocsr()
            # Over the stored values in slices, so the float64 squares never cost a full copy of X.
            for lo in range(0, csr.nnz, _SCALE_BLOCK):
                idx = csr.indices[lo:lo + _SCALE_BLOCK]
                vals = csr.data[lo:lo + _SCALE_BLOCK].astype(np.float64)
                self.total += np.bincount(idx, weights=vals, minlength=len(self.total))
                self.total_sq += np.bincount(idx, weights=vals * vals, minlength=len(self.total))
        else:
            arr = np.asarray(X)
            self.total += arr.sum(axis=0, dtype=np.float64)
            self.total_sq += np.einsum("ij,ij->j", arr, arr, dtype=np.float64)
        return self

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        n = max(self.n, 1)
        mean = self.total / n
        return mean, np.maximum(self.total_sq / n - mean**2, 0.0)


def mean_var(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and (population) variance without densifying or copying a sparse X."""
    return MeanVar(X.shape[1]).add(X).result()


def highly_variable_genes(X_lognorm, var_names: Sequence[str], n_top: int, keep: Iterable[str] = (),
                          n_bins: int = 20) -> np.ndarray:
    """Indices (ascending) of the `n_top` most variable genes of X, always including the genes in `keep`."""
    mean, var = mean_var(X_lognorm)
    return select_variable_genes(mean, var, var_names, n_top, keep, n_bins)


def select_variable_genes(mean: np.ndarray, var: np.ndarray, var_names: Sequence[str], n_top: int,
                          keep: Iterable[str] = (), n_bins: int = 20) -> np.ndarray:
    """Indices (ascending) of the `n_top` most variable genes given their log-normalized mean and
    variance, always including the genes in `keep`.

    Seurat-style: dispersion (var/mean) z-scored within bins of mean expression, so highly expressed
    genes do not crowd out the rest. Perturbed genes are kept because a model must predict their
    own knock-down and the evaluator excludes/inspects them by name.
    """
    names = pd.Index(var_names)
    n_genes = len(names)
    if n_top >= n_genes:
        return np.arange(n_genes)
    disp = np.log(np.divide(var, mean, out=np.zeros_like(var), where=mean > 0) + 1e-12)
    expressed = mean > 0
    bins = pd.cut(pd.Series(mean), bins=n_bins, labels=False)
    frame = pd.DataFrame({"bin": bins, "disp": disp})
    stats = frame[expressed].groupby("bin")["disp"].agg(["mean", "std"])
    mu = frame["bin"].map(stats["mean"]).to_numpy(dtype=float)
    sd = frame["bin"].map(stats["std"]).fillna(0).to_numpy(dtype=float)
    # A bin with a single gene has no spread: score it by its raw dispersion deviation instead of NaN.
    z = np.where(sd > 0, (disp - mu) / np.where(sd > 0, sd, 1), 0.0)
    score = np.where(expressed, z, -np.inf)

    forced = np.zeros(n_genes, dtype=bool)
    keep_idx = names.get_indexer(pd.Index(list(keep)).unique())
    forced[keep_idx[keep_idx >= 0]] = True
    n_rest = max(n_top - int(forced.sum()), 0)
    order = np.argsort(-np.where(forced, -np.inf, score), kind="stable")
    chosen = forced.copy()
    chosen[[i for i in order[:n_rest] if not forced[i]]] = True
    return np.flatnonzero(chosen)


def group_indicator(labels: Sequence[str] | np.ndarray) -> tuple[sp.csr_matrix, pd.Index]:
    """A (groups x cells) sparse matrix whose rows average the cells of each group, and the group names."""
    codes, groups = pd.factorize(np.asarray(labels, dtype=object), sort=True)
    counts = np.bincount(codes, minlength=len(groups)).astype(np.float64)
    n = len(codes)
    weights = 1.0 / counts[codes]
    return sp.csr_matrix((weights, (codes, np.arange(n))), shape=(len(groups), n)), pd.Index(groups)


def pseudobulk(X, labels: Sequence[str] | np.ndarray) -> pd.DataFrame:
    """Mean profile per label: a (labels x genes) float64 frame, computed as one sparse product."""
    indicator, groups = group_indicator(labels)
    means = indicator @ X
    means = means.toarray() if sp.issparse(means) else np.asarray(means)
    return pd.DataFrame(means, index=groups)


ATAC_TRANSFORMS = ("binarize", "tfidf")
MODALITY_ORDER = ("rna", "protein", "atac")  # the order of the blocks side by side; other features are dropped


def block_order(blocks: np.ndarray) -> np.ndarray:
    """The column order `transform_blocks` returns: RNA columns, then protein, then ATAC."""
    return np.concatenate([np.flatnonzero(blocks == name) for name in MODALITY_ORDER] + [np.zeros(0, np.int64)])


def transform_blocks(X, blocks: np.ndarray, rna_is_counts: bool, atac: str = "binarize",
                     idf: np.ndarray | None = None, *, in_place: bool = False):
    """Transform each modality block of X on its own and return them side by side (RNA, protein, ATAC).

    RNA counts are `normalize_log1p`-ed on RNA columns only (proteins and peaks must not enter the
    library size); log-normalized RNA is kept; proteins get CLR; peaks are binarized, or TF-IDF-ed
    with `idf` (pass the training cells' idf so every part is weighted alike). Columns of any other
    feature type are dropped. Returns `(matrix, column_order)`.
    `in_place=True` lets RNA normalization reuse X's buffers (X must be the caller's own copy).
    """
    if atac not in ATAC_TRANSFORMS:
        raise ValueError(f"atac transform {atac!r}: expected one of {ATAC_TRANSFORMS}")
    parts, order = [], []
    for name in MODALITY_ORDER:
        cols = np.flatnonzero(blocks == name)
        if not cols.size:
            continue
        sub = X if cols.size == X.shape[1] else X[:, cols]
        if name == "rna":
            sub = normalize_log1p(sub, in_place=in_place and sub is X) if rna_is_counts else (
                sub.astype(np.float32, copy=False) if sp.issparse(sub) else np.asarray(sub, dtype=np.float32))
        elif name == "protein":
            sub = clr(sub)
        else:
            sub = tfidf(sub, idf) if atac == "tfidf" else binarize(sub)
        parts.append(sub)
        order.append(cols)
    column_order = np.concatenate(order)
    if len(parts) == 1:
        return parts[0], column_order
    if any(sp.issparse(p) for p in parts):
        return sp.hstack([sp.csr_matrix(p) for p in parts], format="csr", dtype=np.float32), column_order
    return np.hstack(parts).astype(np.float32), column_order
