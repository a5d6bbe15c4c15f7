"""Reading and writing the data: the split's h5ad parts, the table of conditions (one row per perturbation,
dose and context) with each condition's control profile and, for training conditions, its mean Δ.

A large screen's parts are a sample of their cells (`uns["sample"]`), and DIR/pseudobulk.h5ad holds every
training condition's mean over all of its cells: the condition and control means are taken from it then,
and the sampled cells serve only where single cells are needed (`cell_sample`)."""

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CONTROL = "control"
TARGETS_UNS = "perturbation_targets"  # the split's per-perturbation annotation table (targets)
PSEUDOBULK = "pseudobulk.h5ad"  # per training condition: mean over all its cells, `n_cells`; with sampled parts
SAMPLE_UNS = "sample"  # uns key of a part that holds a sample of its cells


def dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def write_h5ad(adata, path) -> None:
    """Write with plain string storage: text columns as categoricals and object-dtype names, which every
    anndata version writes and reads (pandas ≥ 3 would otherwise hand it nullable string arrays)."""
    for frame in (adata.obs, adata.var):
        for column in frame.columns:
            if frame[column].dtype.kind in "OSU" or str(frame[column].dtype).startswith("str"):
                frame[column] = pd.Categorical(frame[column].astype(object))
    adata.obs_names = pd.Index([str(x) for x in adata.obs_names], dtype=object)
    adata.var_names = pd.Index([str(x) for x in adata.var_names], dtype=object)
    adata.write_h5ad(path)


def group_means(X, labels: np.ndarray, order: list[str]) -> np.ndarray:
    """Mean row of X per label in `order`, without densifying X (sparse indicator product)."""
    index = {c: i for i, c in enumerate(order)}
    rows = np.array([index.get(str(lab), -1) for lab in labels])
    keep = np.flatnonzero(rows >= 0)
    indicator = sp.csr_matrix((np.ones(len(keep)), (rows[keep], keep)), shape=(len(order), len(labels)))
    counts = np.asarray(indicator.sum(axis=1)).ravel()
    return dense(indicator @ X) / np.maximum(counts, 1)[:, None]


def condition_table(obs: pd.DataFrame) -> pd.DataFrame:
    """One row per perturbed condition: condition, perturbation, dose, context."""
    perturbed = obs.loc[~obs["is_control"].astype(bool)]
    table = perturbed.loc[:, ["condition", "perturbation", "dose", "context"]].drop_duplicates("condition")
    table = table.astype({"condition": str, "perturbation": str, "context": str, "dose": float})
    return table.sort_values("condition").reset_index(drop=True)


def annotate(table: pd.DataFrame, uns) -> pd.DataFrame:
    """Add a `targets` column (`;`-joined annotated target genes, empty when unknown) from a split part's
    uns["perturbation_targets"] (equal-length lists `perturbation`, `targets`); no annotations: empty strings."""
    listed = uns.get(TARGETS_UNS, {})
    known = {str(p): str(t) for p, t in zip(listed.get("perturbation", []), listed.get("targets", []))}
    return table.assign(targets=[known.get(p, "") for p in table["perturbation"]])


def target_positions(table: pd.DataFrame, pos: dict[str, int]) -> list[list[int]]:
    """Positions (in `pos`) of each row's annotated target genes that are measured (`targets` column)."""
    column = table["targets"] if "targets" in table.columns else [""] * len(table)
    return [[pos[g] for g in str(value).split(";") if g in pos] for value in column]


def read_pseudobulk(data: Path) -> ad.AnnData | None:
    """DIR/pseudobulk.h5ad when the service gave one (the parts are samples), else None."""
    path = Path(data) / PSEUDOBULK
    return ad.read_h5ad(path) if path.exists() else None


def control_means(adata, bulk: ad.AnnData | None = None) -> dict[str, np.ndarray]:
    """Mean control profile per context: from `bulk` (every control cell, weighted by its count) when
    given, else from the cells of `adata`."""
    if bulk is not None:
        ctrl = bulk.obs["is_control"].astype(bool).to_numpy()
        contexts = bulk.obs["context"].astype(str).to_numpy()[ctrl]
        weights = bulk.obs["n_cells"].to_numpy(dtype=np.float64)[ctrl]
        sums = dense(bulk.X[ctrl]).astype(np.float64) * weights[:, None]
        return {c: sums[contexts == c].sum(axis=0) / weights[contexts == c].sum() for c in sorted(set(contexts))}
    ctrl = adata.obs["is_control"].astype(bool).to_numpy()
    contexts = adata.obs["context"].astype(str).to_numpy()[ctrl]
    order = sorted(set(contexts))
    means = group_means(adata.X[ctrl], contexts, order)
    return {c: means[i] for i, c in enumerate(order)}


class ConditionSet:
    """Conditions of one split part: identity table, the control profile of each row, Δ when known."""

    def __init__(self, table: pd.DataFrame, controls: dict[str, np.ndarray], means: np.ndarray | None = None):
        self.table = table.reset_index(drop=True)
        pooled = np.mean(list(controls.values()), axis=0)
        self.control = np.stack([controls.get(c, pooled) for c in self.table["context"]]) if len(self.table) \
            else np.zeros((0, len(pooled)))
        self.delta = None if means is None else means - self.control

    def __len__(self) -> int:
        return len(self.table)

    def subset(self, rows: np.ndarray) -> "ConditionSet":
        """The conditions selected by a boolean mask or by positions, with their controls and Δ."""
        out = ConditionSet.__new__(ConditionSet)
        out.table = self.table.iloc[rows].reset_index(drop=True)
        out.control = self.control[rows]
        out.delta = None if self.delta is None else self.delta[rows]
        return out

    @classmethod
    def from_cells(cls, adata, controls: dict[str, np.ndarray], bulk: ad.AnnData | None = None) -> "ConditionSet":
        """The conditions of `adata`'s cells with their means: from `bulk` (all cells) when given."""
        table = annotate(condition_table(adata.obs), adata.uns)
        if bulk is not None:
            row = {str(c): i for i, c in enumerate(bulk.obs["condition"])}
            means = dense(bulk.X[[row[c] for c in table["condition"]]]).astype(np.float64)
        else:
            means = group_means(adata.X, adata.obs["condition"].astype(str).to_numpy(), list(table["condition"]))
        return cls(table, controls, means)



def read_part(data: Path, name: str) -> ad.AnnData:
    path = Path(data) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: expected train.h5ad, val_inputs.h5ad and test_inputs.h5ad "
                                f"in {data}")
    return ad.read_h5ad(path)


def targets_of(inputs: ad.AnnData) -> pd.DataFrame:
    """The conditions an inputs part (val_inputs or test_inputs) asks to predict, with their annotations."""
    predict = inputs.uns["predict"]
    table = pd.DataFrame({k: list(predict[k]) for k in ("condition", "perturbation", "dose", "context")})
    return annotate(table.astype({"condition": str, "perturbation": str, "context": str, "dose": float}),
                    inputs.uns)


def conditions_to_predict(inputs: ad.AnnData, train_controls: dict[str, np.ndarray]) -> ConditionSet:
    """The conditions of an inputs part, each with its context's control profile (the inputs' own control
    cells where they have some, else the training controls of that context). A sampled part's controls are
    a sample of training controls, whose means over every cell `train_controls` already hold."""
    own = {} if SAMPLE_UNS in inputs.uns else control_means(inputs)
    return ConditionSet(targets_of(inputs), {**train_controls, **own})


def predictions_adata(conditions: ConditionSet, delta: np.ndarray, genes: list[str]) -> ad.AnnData:
    """Predicted profiles (control + Δ) in the predictions format: one row per condition, obs = its identity."""
    obs = conditions.table.loc[:, ["condition", "perturbation", "dose", "context"]].copy()
    obs.index = obs["condition"].to_numpy()
    X = (conditions.control + delta).astype(np.float32)
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[str(g) for g in genes]))


def cell_sample(train: ad.AnnData, limit: int, seed: int,
                rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dense sample of training cells with their contexts and control flags (controls always kept
    up to half the sample, so the expression input has enough of them), drawn among `rows` (increasing
    positions in `train`; default every cell). The row indices are drawn first and only those rows of X are
    read: `train[rows].X` would copy the matrix of every row in `rows` (up to the whole part) first. The
    draw is the one `cell_sample(train[rows], limit, seed)` makes: the same cells for the same seed."""
    rng = np.random.default_rng(seed)
    is_ctrl = train.obs["is_control"].astype(bool).to_numpy()
    rows = np.arange(train.n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
    ctrl, other = rows[is_ctrl[rows]], rows[~is_ctrl[rows]]
    take_ctrl = rng.choice(ctrl, size=min(limit // 2, len(ctrl)), replace=False)
    take_other = rng.choice(other, size=min(limit - len(take_ctrl), len(other)), replace=False)
    pick = np.sort(np.concatenate([take_ctrl, take_other]))
    return (dense(train.X[pick]).astype(np.float64), train.obs["context"].astype(str).to_numpy()[pick],
            is_ctrl[pick])
