class PerturbationEncoder:
    """Drug described by its annotated target genes × dose ({dose_encoding}), so an unseen drug is placed by
    what it hits (chemCPA-style features, here from the data's own annotations).

    Genes are embedded as in the linear baseline of Ahlmann-Eltze et al.: their rows of the top principal
    directions (K ≤ 10) of the training Δ minus the mean Δ of each context and dose, i.e. how each gene
    moves across the training drugs' specific responses. A drug is the sum of its measured target genes'
    rows (`targets` column, from the split's uns["perturbation_targets"]). Features: the dose terms and the target embedding times each dose term,
    so a linear map can give every dose its own response to the same targets. A drug with no measured
    target keeps only the dose terms (the average drug response at that dose)."""

    def __init__(self, config: Config):
        self.dim = min(10, config.embedding_dim)
        self.encoding = config.dose_encoding

    def fit(self, train: ConditionSet, genes: list[str], cells: np.ndarray) -> "PerturbationEncoder":
        self.max_dose = float(np.nanmax(train.table["dose"].to_numpy(dtype=float), initial=1.0))
        residuals = response_residuals(train.table, train.delta)
        k = max(1, min(self.dim, residuals.shape[0] - 1, residuals.shape[1]))
        self.G = np.linalg.svd(residuals, full_matrices=False)[2][:k].T
        self.pos = {g: i for i, g in enumerate(genes)}
        return self

    @property
    def dose_width(self) -> int:
        return 3 if self.encoding == "log_hill" else 1

    @property
    def width(self) -> int:
        return self.dose_width * (1 + self.G.shape[1])

    def embed(self, table: pd.DataFrame) -> np.ndarray:
        out = np.zeros((len(table), self.G.shape[1]))
        for row, idx in enumerate(target_positions(table, self.pos)):
            if idx:
                out[row] = self.G[idx].sum(axis=0)
        return out

    def transform(self, table: pd.DataFrame) -> np.ndarray:
        doses = dose_features(table["dose"].to_numpy(dtype=float), self.max_dose, self.encoding)
        emb = self.embed(table)
        # explicit width: a table with no rows (no val conditions) still gets its (0, width) features
        crossed = (emb[:, None, :] * doses[:, :, None]).reshape(len(table), doses.shape[1] * emb.shape[1])
        return np.concatenate([doses, crossed], axis=1)
