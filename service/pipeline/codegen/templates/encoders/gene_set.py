class PerturbationEncoder:
    """Target gene(s) → a vector of a gene embedding learnt from training data (source: {source}).

    pca: rows of the top principal directions of the training Δ matrix (genes × conditions), so an
    unseen knockout is placed by how its target gene co-varies with measured responses;
    coexpression: gene loadings of the control cells' principal components. Combos sum (or average)
    their genes' rows; a target that is not a measured gene gets the zero vector."""

    def __init__(self, config: dict):
        self.dim = int(config["embedding_dim"])
        self.source = config["gene_embedding_source"]
        self.aggregation = config.get("combo_aggregation") or "sum"

    def fit(self, train: ConditionSet, genes: list[str], control_cells: np.ndarray) -> "PerturbationEncoder":
        if self.source == "pca":
            Y = train.delta.T - train.delta.T.mean(axis=1, keepdims=True)
        else:
            Y = (control_cells - control_cells.mean(axis=0)).T
        k = max(1, min(self.dim, Y.shape[1] - 1, Y.shape[0]))
        self.G = np.linalg.svd(Y, full_matrices=False)[0][:, :k]
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
                out[row] = rows.mean(axis=0) if self.aggregation == "attention" else rows.sum(axis=0)
        return out
