class BasePredictor:
    """No closed-form base: the network predicts the whole Δ."""

    def __init__(self, config: Config, genes: list[str]):
        self.chosen = {}

    def fit(self, train: ConditionSet, F_train: np.ndarray, val: ConditionSet, F_val: np.ndarray,
            cells: np.ndarray | None = None, is_control: np.ndarray | None = None,
            self_effect=None, run_contexts: int | None = None) -> "BasePredictor":
        self.n_genes = train.delta.shape[1]
        return self

    def predict(self, conditions: ConditionSet, F: np.ndarray) -> np.ndarray:
        return np.zeros((len(conditions), self.n_genes))

    def out_of_fold(self, train: ConditionSet, F_train: np.ndarray) -> np.ndarray:
        return self.predict(train, F_train)
