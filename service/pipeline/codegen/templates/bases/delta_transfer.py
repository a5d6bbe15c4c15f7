class BasePredictor:
    """Closed-form base: a convex blend a·T + (1 − a)·M of the perturbation's Δ measured in the other
    training contexts (T, same dose when there is one) and the mean training Δ (M). a ∈ [0, 1] is
    fitted by least squares on leave-context-out predictions of the training conditions, so it says how
    well responses transfer across contexts in this dataset; a convex blend never shrinks the response
    magnitude, which a new context need not share with the training ones."""

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
        if train.table["context"].nunique() > 1:
            gap = (parts[:, 0] - parts[:, 1]).reshape(-1)
            target = (train.delta - parts[:, 1]).reshape(-1)
            a = float(np.clip(gap @ target / max(gap @ gap, 1e-12), 0.0, 1.0))
            self.weights = np.array([a, 1.0 - a])
        self.chosen = {"transfer_weight": float(self.weights[0]), "mean_weight": float(self.weights[1])}
        return self

    def predict(self, conditions: ConditionSet, F: np.ndarray) -> np.ndarray:
        if not len(conditions):
            return np.zeros((0, self.delta.shape[1]))
        return self._blend(conditions, False)

    def out_of_fold(self, train: ConditionSet, F_train: np.ndarray) -> np.ndarray:
        return self._blend(train, True)
