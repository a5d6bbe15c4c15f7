class PerturbationEncoder:
    """Drug identity × dose. The identity is {identity}; a drug never seen in training keeps only the
    dose terms, i.e. the average drug response at that dose."""

    def __init__(self, config: Config):
        self.dim = config.embedding_dim
        self.encoding = config.dose_encoding
        self.signature = config.perturbation_encoder == "drug_embedding_dose"

    def fit(self, train: ConditionSet, genes: list[str], cells: np.ndarray) -> "PerturbationEncoder":
        self.max_dose = float(np.nanmax(train.table["dose"].to_numpy(dtype=float), initial=1.0))
        self.drugs = sorted(set(train.table["perturbation"]))
        if self.signature:
            centred = train.delta - train.delta.mean(axis=0)
            k = max(1, min(self.dim, centred.shape[0] - 1, centred.shape[1]))
            self.components = np.linalg.svd(centred, full_matrices=False)[2][:k]
            per_drug = np.stack([centred[(train.table["perturbation"] == d).to_numpy()].mean(axis=0)
                                 for d in self.drugs])
            self.vectors = per_drug @ self.components.T
        else:
            self.vectors = np.eye(len(self.drugs))
        return self

    @property
    def width(self) -> int:
        return self.dose_width + self.vectors.shape[1]

    @property
    def dose_width(self) -> int:
        return 3 if self.encoding == "log_hill" else 1

    def transform(self, table: pd.DataFrame) -> np.ndarray:
        doses = dose_features(table["dose"].to_numpy(dtype=float), self.max_dose, self.encoding)
        pos = {d: i for i, d in enumerate(self.drugs)}
        identity = np.zeros((len(table), self.vectors.shape[1]))
        for row, drug in enumerate(table["perturbation"]):
            if drug in pos:
                identity[row] = self.vectors[pos[drug]]
        return np.concatenate([doses, identity * doses[:, :1]], axis=1)
