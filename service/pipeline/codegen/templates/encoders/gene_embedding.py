class PerturbationEncoder:
    """Target gene(s) → a vector of a gene embedding learnt from training cells (source: {source}).

    Each gene is embedded by its loadings on the top principal components of a sample of training
    cells (perturbed and control), scaled by each component's spread and normalised to unit length,
    so genes that co-vary across cells lie close: an unseen knockout is placed next to the perturbed
    genes it is co-regulated with. pca works on centred log-expression (covariance); coexpression on
    z-scored genes (correlation). Combos sum (gene_set: sum or average) their genes' rows; a target
    that is not a measured gene gets the zero vector."""

    def __init__(self, config: Config):
        self.dim = config.embedding_dim
        self.source = config.gene_embedding_source
        self.aggregation = config.combo_aggregation or "sum"

    def fit(self, train: ConditionSet, genes: list[str], cells: np.ndarray) -> "PerturbationEncoder":
        centred = cells - cells.mean(axis=0)
        if self.source == "coexpression":
            centred = centred / np.maximum(centred.std(axis=0), 1e-6)
        k = max(1, min(self.dim, centred.shape[0] - 1, centred.shape[1]))
        _, spread, components = np.linalg.svd(centred, full_matrices=False)
        G = components[:k].T * spread[:k]
        G = G / np.maximum(np.linalg.norm(G, axis=1, keepdims=True), 1e-12)
        # Beside co-variation across cells, co-variation across the training responses (the gene
        # embedding of the linear PCA-ridge baseline): genes that move together when perturbed.
        delta = response_residuals(train.table, train.delta)
        kd = max(1, min(self.dim, delta.shape[0] - 1, delta.shape[1]))
        D = np.linalg.svd(delta, full_matrices=False)[2][:kd].T
        self.G = np.hstack([G, D])
        self.pos = {g: i for i, g in enumerate(genes)}
        return self

    @property
    def width(self) -> int:
        return self.G.shape[1]

    def transform(self, table: pd.DataFrame) -> np.ndarray:
        out = np.zeros((len(table), self.width))
        for row, perturbation in enumerate(table["perturbation"]):
            idx = [self.pos[g] for g in str(perturbation).split("+") if g in self.pos]
            if idx:
                rows = self.G[idx]
                out[row] = rows.mean(axis=0) if self.aggregation == "mean" else rows.sum(axis=0)
        return out
