class BasePredictor:
    """Closed-form base: the perturbation's Δ measured in the other training contexts (same dose when
    there is one), else the mean training Δ of the context and dose."""

    def __init__(self, config: dict):
        self.chosen = {}

    def fit(self, train: ConditionSet, F_train: np.ndarray, val: ConditionSet, F_val: np.ndarray) -> "BasePredictor":
        self.table, self.delta = train.table, train.delta
        return self

    def _one(self, perturbation: str, dose: float, context: str, exclude_same_context: bool) -> np.ndarray:
        t = self.table
        same = (t["perturbation"] == perturbation).to_numpy()
        if exclude_same_context:
            same &= (t["context"] != context).to_numpy()
        if same.any():
            return mean_delta_by(t[same], self.delta[same], context, dose)
        return mean_delta_by(t, self.delta, context, dose)

    def predict(self, conditions: ConditionSet, F: np.ndarray) -> np.ndarray:
        if not len(conditions):
            return np.zeros((0, self.delta.shape[1]))
        return np.stack([self._one(r.perturbation, r.dose, r.context, False) for r in conditions.table.itertuples()])

    def out_of_fold(self, train: ConditionSet, F_train: np.ndarray) -> np.ndarray:
        return np.stack([self._one(r.perturbation, r.dose, r.context, True) for r in train.table.itertuples()])
