class BasePredictor:
    """Closed-form base for a context unseen in training: the mean of two linear predictors of Δ that
    place a context by its control profile.

    Convergence blend M + a·(T − M) + k·P: T the perturbation's Δ measured in the other training contexts
    (same dose when there is one), M the mean training Δ, P = (mean control profile of the other training
    contexts − this context's control profile), how far the context sits from the others, which responses
    partly close (stimulated cells of different types converge on shared states). a, k ∈ [0, 1] are fitted
    by least squares on leave-context-out predictions of the training conditions; both 0 is mean Δ.

    Context ridge: the perturbation's Δ as a linear function of the context's control profile (its
    coordinates on the principal directions of the training contexts' control profiles), ridge-fitted
    over the training contexts where it was measured (the linear_context_ridge baseline's recipe).

    Their weights cannot be fitted leave-context-out when training has two contexts (the ridge from one
    context is T), so they are averaged: two different estimators of one response, whose errors partly
    cancel."""

    def __init__(self, config: dict, genes: list[str]):
        self.chosen = {}
        self.a, self.k = 1.0, 0.0
        self.lam = 0.1

    def _ridge(self, row, pool: np.ndarray, mean: np.ndarray) -> np.ndarray:
        t = self.table
        rows = pool & (t["perturbation"] == row.perturbation).to_numpy()
        same_dose = rows & same_dose_as(t, row.dose)
        rows = same_dose if same_dose.any() else rows if rows.any() else pool
        if not rows.any():
            return mean
        Z, Y = self.z_of(t["context"][rows]), self.delta[rows]
        z_mean, y_mean = Z.mean(axis=0), Y.mean(axis=0)
        W = ridge(Z - z_mean, Y - y_mean, self.lam)
        return y_mean + (self.project(row.control) - z_mean) @ W

    def _parts(self, row, exclude_same_context: bool) -> tuple[np.ndarray, ...]:
        t, context = self.table, row.context
        other = (t["context"] != context).to_numpy()
        pool = other if exclude_same_context else np.ones(len(t), dtype=bool)
        mean = mean_delta_by(t[pool], self.delta[pool], context, row.dose)
        same = (t["perturbation"] == row.perturbation).to_numpy() & other
        transfer = mean_delta_by(t[same], self.delta[same], context, row.dose) if same.any() else mean
        # A context with training conditions of its own: its mean Δ already holds its convergence.
        others = [profile for c, profile in self.controls.items() if c != context]
        unseen = exclude_same_context or context not in self.controls
        pull = np.mean(others, axis=0) - row.control if others and unseen else np.zeros_like(mean)
        return transfer, mean, pull, self._ridge(row, pool, mean)

    def _rows(self, conditions: ConditionSet, exclude_same_context: bool) -> list[tuple[np.ndarray, ...]]:
        table = conditions.table.assign(control=list(conditions.control))
        return [self._parts(r, exclude_same_context) for r in table.itertuples()]

    def _combine(self, rows: list[tuple[np.ndarray, ...]]) -> np.ndarray:
        return np.stack([0.5 * (m + self.a * (t - m) + self.k * p) + 0.5 * r for t, m, p, r in rows])

    def project(self, profile: np.ndarray) -> np.ndarray:
        return (profile - self.centre) @ self.directions.T

    def z_of(self, contexts: pd.Series) -> np.ndarray:
        return np.stack([self.project(self.controls[c]) for c in contexts])

    def fit(self, train: ConditionSet, F_train: np.ndarray, val: ConditionSet, F_val: np.ndarray) -> "BasePredictor":
        self.table, self.delta = train.table, train.delta
        self.controls = {c: train.control[i] for i, c in enumerate(train.table["context"])}
        profiles = np.stack(list(self.controls.values()))
        self.centre = profiles.mean(axis=0)
        rank = max(1, min(10, len(profiles) - 1))
        self.directions = np.linalg.svd(profiles - self.centre, full_matrices=False)[2][:rank]
        if len(self.controls) > 1:
            rows = self._rows(train, True)
            gap = np.concatenate([t - m for t, m, _, _ in rows])
            pull = np.concatenate([p for _, _, p, _ in rows])
            target = np.concatenate([d - m for d, (_, m, _, _) in zip(train.delta, rows)])
            a, k = np.linalg.lstsq(np.stack([gap, pull], axis=1), target, rcond=None)[0]
            self.a = float(np.clip(a, 0.0, 1.0))
            # a clipped: the best k given that a, in closed form.
            k = pull @ (target - self.a * gap) / max(pull @ pull, 1e-12)
            # Leave-context-out, T carries the other contexts' convergence, −k·P/(n − 1) of the held-out one,
            # so the fitted slope is k·(1 + a/(n − 1)); a new context's T (all n contexts) carries none.
            self.k = float(np.clip(k / (1.0 + self.a / (len(self.controls) - 1)), 0.0, 1.0))
        self.chosen = {"transfer_weight": self.a, "convergence_weight": self.k, "context_ridge_lambda": self.lam}
        return self

    def predict(self, conditions: ConditionSet, F: np.ndarray) -> np.ndarray:
        if not len(conditions):
            return np.zeros((0, self.delta.shape[1]))
        return self._combine(self._rows(conditions, False))

    def out_of_fold(self, train: ConditionSet, F_train: np.ndarray) -> np.ndarray:
        return self._combine(self._rows(train, True))
