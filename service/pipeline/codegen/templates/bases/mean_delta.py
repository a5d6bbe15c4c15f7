class BasePredictor:
    """Closed-form base: the mean training Δ of the same context and dose (the mean-Δ baseline)."""

    def __init__(self, config: Config, genes: list[str]):
        self.config = config
        self.chosen = {}

    def fit(self, train: ConditionSet, F_train: np.ndarray, val: ConditionSet, F_val: np.ndarray,
            cells: np.ndarray | None = None, is_control: np.ndarray | None = None,
            self_effect=None, run_contexts: int | None = None) -> "BasePredictor":
        self.table, self.delta = train.table, train.delta
        return self

    def predict(self, conditions: ConditionSet, F: np.ndarray) -> np.ndarray:
        if not len(conditions):
            return np.zeros((0, self.delta.shape[1]))
        return np.stack([mean_delta_by(self.table, self.delta, r.context, r.dose)
                         for r in conditions.table.itertuples()])

    def out_of_fold(self, train: ConditionSet, F_train: np.ndarray) -> np.ndarray:
        return self.predict(train, F_train)
