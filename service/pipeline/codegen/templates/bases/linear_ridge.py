class BasePredictor:
    """Closed-form base: Δ ≈ mean Δ(context, dose) + F·W, W by ridge on the perturbation features F
    (the linear-PCA-ridge recipe). λ is chosen from config.ridge_lambdas by the squared error of
    5-fold out-of-fold predictions of the training conditions plus that of the validation conditions,
    so a handful of validation conditions cannot pick it alone. With doses, folds hold out whole
    perturbations (every dose and context), as a split of unseen compounds does: a fold that keeps the
    other doses of a held-out compound rewards memorising it and picks a λ too small for unseen ones."""

    def __init__(self, config: dict):
        self.lambdas = [float(x) for x in config["ridge_lambdas"]]
        self.chosen = {}

    def _offsets(self, table: pd.DataFrame) -> np.ndarray:
        return np.stack([mean_delta_by(self.table, self.delta, r.context, r.dose) for r in table.itertuples()])

    def _folds(self, train: ConditionSet, F_train: np.ndarray, lam: float, folds: int = 5) -> np.ndarray:
        n = len(train)
        out = np.zeros_like(train.delta)
        R = train.delta - self._offsets(train.table)
        # Fold unit: the perturbation when there are doses (its doses are one response curve, near-duplicates
        # of each other), else the condition.
        dosed = not np.isnan(train.table["dose"].to_numpy(dtype=float)).all()
        unit_of = train.table["perturbation"].to_numpy() if dosed else np.arange(n)
        units = np.random.default_rng(0).permutation(np.unique(unit_of))
        for k in range(min(folds, len(units))):
            held = np.flatnonzero(np.isin(unit_of, units[k::folds]))
            fit = np.setdiff1d(np.arange(n), held)
            W = ridge(F_train[fit], R[fit], lam) if len(fit) else np.zeros((F_train.shape[1], R.shape[1]))
            out[held] = self._offsets(train.table.iloc[held]) + F_train[held] @ W
        return out

    def fit(self, train: ConditionSet, F_train: np.ndarray, val: ConditionSet, F_val: np.ndarray) -> "BasePredictor":
        self.table, self.delta = train.table, train.delta
        R = train.delta - self._offsets(train.table)
        scores = {}
        for lam in self.lambdas:
            errors = np.sum((self._folds(train, F_train, lam) - train.delta) ** 2)
            if len(val):
                pred = self._offsets(val.table) + F_val @ ridge(F_train, R, lam)
                errors += np.sum((pred - val.delta) ** 2)
            scores[lam] = float(errors / ((len(train) + len(val)) * train.delta.shape[1]))
        self.lam = min(scores, key=lambda lam: (scores[lam], -lam))
        self.W = ridge(F_train, R, self.lam)
        self.chosen = {"ridge_lambda": self.lam, "cv_mse_by_lambda": scores}
        return self

    def predict(self, conditions: ConditionSet, F: np.ndarray) -> np.ndarray:
        if not len(conditions):
            return np.zeros((0, self.delta.shape[1]))
        return self._offsets(conditions.table) + F @ self.W

    def out_of_fold(self, train: ConditionSet, F_train: np.ndarray) -> np.ndarray:
        """Base predictions of training conditions from fits that did not see them, so the residual
        network learns the base's generalisation error rather than its in-sample fit."""
        return self._folds(train, F_train, self.lam)
