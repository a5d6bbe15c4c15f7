class PerturbationEncoder:
    """One indicator per training perturbation; a perturbation never seen in training gets zeros
    (its prediction then comes from the context and base terms alone)."""

    def __init__(self, config: Config):
        self.dim = config.embedding_dim

    def fit(self, train: ConditionSet, genes: list[str], cells: np.ndarray) -> "PerturbationEncoder":
        self.vocabulary = sorted(set(train.table["perturbation"]))
        return self

    @property
    def width(self) -> int:
        return len(self.vocabulary)

    def transform(self, table: pd.DataFrame) -> np.ndarray:
        return context_onehot(list(table["perturbation"]), self.vocabulary)
