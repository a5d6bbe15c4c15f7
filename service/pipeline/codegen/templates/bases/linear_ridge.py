class BasePredictor:
    """Closed-form base: Δ ≈ mean Δ(context, dose) + F·W, W by ridge on the perturbation features F
    (the linear-PCA-ridge recipe), λ chosen on the validation conditions from config.ridge_lambdas."""

    def __init__(self, config: dict):
        self.lambdas = [float(x) for x in config["ridge_lambdas"]]
        self.chosen = {}

    def _offsets(self, table: pd.DataFrame) -> np.ndarray:
        return np.stack([mean_delta_by(self.table, self.delta, r.context, r.dose) for r in table.itertuples()])

    def _fit_w(self, F: np.ndarray, R: np.ndarray, lam: float) -> np.ndarray:
        return ridge(F, R, lam)

    def fit(self, train: ConditionSet, F_train: np.ndarray, val: ConditionSet, F_val: np.ndarray) -> "BasePredictor":
        self.table, self.delta = train.table, train.delta
        R = train.delta - self._offsets(train.table)
        scores = {}
        for lam in self.lambdas:
            W = self._fit_w(F_train, R, lam)
            pred = self._offsets(val.table) + F_val @ W if len(val) else None
            scores[lam] = float(np.mean((pred - val.delta) ** 2)) if pred is not None else 0.0
        self.lam = min(scores, key=lambda lam: (scores[lam], -lam))
        self.W = self._fit_w(F_train, R, self.lam)
        self.chosen = {"ridge_lambda": self.lam, "val_mse_by_lambda": scores}
        return self

    def predict(self, conditions: ConditionSet, F: np.ndarray) -> np.ndarray:
        if not len(conditions):
            return np.zeros((0, self.delta.shape[1]))
        return self._offsets(conditions.table) + F @ self.W

    def out_of_fold(self, train: ConditionSet, F_train: np.ndarray, folds: int = 5) -> np.ndarray:
        """Base predictions of training conditions from fits that did not see them, so the residual
        network learns the base's generalisation error rather than its in-sample fit."""
        n = len(train)
        out = np.zeros_like(train.delta)
        R = train.delta - self._offsets(train.table)
        order = np.random.default_rng(0).permutation(n)
        for k in range(min(folds, n)):
            held = order[k::folds]
            fit = np.setdiff1d(np.arange(n), held)
            W = self._fit_w(F_train[fit], R[fit], self.lam) if len(fit) else np.zeros((F_train.shape[1], R.shape[1]))
            out[held] = self._offsets(train.table.iloc[held]) + F_train[held] @ W
        return out
