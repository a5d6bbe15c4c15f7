class BasePredictor:
    """Closed-form base: a blend a·T + b·M of the perturbation's Δ measured in the other training
    contexts (T, same dose when there is one) and the mean training Δ (M). a and b are fitted by
    least squares on leave-context-out predictions of the training conditions, so they say how well
    responses transfer across contexts in this dataset (a → 0 when they do not)."""

    def __init__(self, config: dict):
        self.chosen = {}
        self.weights = np.array([1.0, 0.0])

    def _parts(self, perturbation: str, dose: float, context: str, exclude_same_context: bool) -> np.ndarray:
        t = self.table
        mean = mean_delta_by(t, self.delta, context, dose) if not exclude_same_context else \
            mean_delta_by(t[(t["context"] != context).to_numpy()], self.delta[(t["context"] != context).to_numpy()],
                          context, dose)
        same = (t["perturbation"] == perturbation).to_numpy() & (t["context"] != context).to_numpy()
        transfer = mean_delta_by(t[same], self.delta[same], context, dose) if same.any() else mean
        return np.stack([transfer, mean])

    def _blend(self, conditions: ConditionSet, exclude_same_context: bool) -> np.ndarray:
        parts = [self._parts(r.perturbation, r.dose, r.context, exclude_same_context)
                 for r in conditions.table.itertuples()]
        return np.stack([self.weights @ p for p in parts])

    def fit(self, train: ConditionSet, F_train: np.ndarray, val: ConditionSet, F_val: np.ndarray) -> "BasePredictor":
        self.table, self.delta = train.table, train.delta
        parts = np.stack([self._parts(r.perturbation, r.dose, r.context, True) for r in train.table.itertuples()])
        if (train.table["context"].nunique() > 1):
            A = parts.transpose(0, 2, 1).reshape(-1, 2)  # (conditions·genes) × [T, M]
            self.weights = np.linalg.lstsq(A, train.delta.reshape(-1), rcond=None)[0]
        self.chosen = {"transfer_weight": float(self.weights[0]), "mean_weight": float(self.weights[1])}
        return self

    def predict(self, conditions: ConditionSet, F: np.ndarray) -> np.ndarray:
        if not len(conditions):
            return np.zeros((0, self.delta.shape[1]))
        return self._blend(conditions, False)

    def out_of_fold(self, train: ConditionSet, F_train: np.ndarray) -> np.ndarray:
        return self._blend(train, True)
