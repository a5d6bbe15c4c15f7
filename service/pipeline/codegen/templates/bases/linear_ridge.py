from scipy.optimize import nnls


class BasePredictor:
    """Closed-form base: Δ ≈ mean Δ(context, dose) + a stack of predictors of the rest from the
    perturbation features F:

    - pooled ridge: F·W over every training condition (the linear-PCA-ridge recipe);
    - grouped ridge: the same fitted per context (per dose when there are doses), as the linear
      baselines fit one model per cell line: responses may differ by context;
    - neighbours: the mean residual of the 5 training perturbations whose features are most similar
      (cosine, positive only) in the same context and dose, which a linear map smooths away.

    When perturbations carry annotated target genes (compounds), three more read the targets directly:
    - target pooled / grouped ridge: the two ridges on target indicators (which measured genes a
      compound hits) instead of F, so compounds sharing a target share its fitted response;
    - target covariation: a compound hitting gene t moves the other genes as they co-vary with t across
      the training residuals (β_t = Rᵀr_t / (r_tᵀr_t + λ·mean‖r‖²)), scaled by the typical residual
      of a target gene at that dose. It needs no training compound with the same target: a target
      that moved downstream of other compounds' targets already shows what it drives.

    Each ridge's λ (from config.ridge_lambdas) and the stack's non-negative weights are fitted on
    out-of-fold predictions of the training conditions plus the validation conditions, so a handful of
    validation conditions cannot pick them alone. Folds hold out whole perturbations (every dose and
    context), as a split of unseen perturbations does: a fold keeping the held-out perturbation's other
    contexts or doses rewards memorising it."""

    COMPONENTS = ("pooled_ridge", "grouped_ridge", "neighbours")
    TARGET_COMPONENTS = ("target_pooled_ridge", "target_grouped_ridge", "target_covariation")
    NEIGHBOURS = 5
    RANK = 10

    def __init__(self, config: dict, genes: list[str]):
        self.lambdas = [float(x) for x in config["ridge_lambdas"]]
        self.loss = config.get("loss", {})
        self.pos = {g: i for i, g in enumerate(genes)}
        self.chosen = {}

    def _indicators(self, fit: np.ndarray, q_table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Target indicator rows of the fitted and the query conditions over the fitted rows' targets."""
        fitted = [self.targets[i] for i in fit]
        vocabulary = {t: i for i, t in enumerate(sorted({t for row in fitted for t in row}))}
        out = []
        for rows in (fitted, target_positions(q_table, self.pos)):
            X = np.zeros((len(rows), max(1, len(vocabulary))))
            for r, targets in enumerate(rows):
                for t in targets:
                    if t in vocabulary:
                        X[r, vocabulary[t]] = 1.0
            out.append(X)
        return tuple(out)

    def _covariation(self, lam: float, fit: np.ndarray, q_table: pd.DataFrame) -> np.ndarray:
        R, table = self.R[fit], self.table.iloc[fit]
        out = np.zeros((len(q_table), R.shape[1]))
        fitted = [self.targets[i] for i in fit]
        reg = lam * float(np.mean(np.sum(R ** 2, axis=0)))
        query = target_positions(q_table, self.pos)
        for row, (targets, dose) in enumerate(zip(query, q_table["dose"].to_numpy(dtype=float))):
            same = same_dose_as(table, dose)
            rows = np.flatnonzero(same) if same.any() else np.arange(len(fit))
            own = [R[r, t] for r in rows for t in fitted[r]]
            typical = float(np.mean(own)) if own else 0.0
            for t in targets:
                out[row] += typical * (R.T @ R[:, t]) / (R[:, t] @ R[:, t] + reg + 1e-12)
        return out

    def _offsets(self, table: pd.DataFrame) -> np.ndarray:
        return np.stack([mean_delta_by(self.table, self.delta, r.context, r.dose) for r in table.itertuples()])

    @staticmethod
    def _groups(table: pd.DataFrame) -> np.ndarray:
        dosed = not np.isnan(table["dose"].to_numpy(dtype=float)).all()
        return (table["dose"].round(9).astype(str) if dosed else table["context"]).to_numpy()

    @staticmethod
    def _slices(table: pd.DataFrame) -> np.ndarray:
        """Context and dose of each row: where neighbours are looked for."""
        return (table["context"] + "|" + table["dose"].round(9).astype(str)).to_numpy()

    def _reduced(self, fit: np.ndarray) -> np.ndarray:
        """R of the rows `fit` on its top principal directions (reduced rank, as the linear baselines:
        responses live on a few directions, and fitting every gene's noise over a few perturbations does
        not generalise). Cached: every ridge and λ of a fold fits the same rows."""
        key = fit.tobytes()
        if key not in self._reduced_cache:
            R = self.R[fit]
            V = np.linalg.svd(R, full_matrices=False)[2][: self.RANK]
            self._reduced_cache[key] = R @ V.T @ V
        return self._reduced_cache[key]

    def _component(self, name: str, lam: float, fit: np.ndarray, F_q: np.ndarray, q_table: pd.DataFrame) -> np.ndarray:
        """Residual predictions for the query rows from the training rows `fit`."""
        F, R, table = self.F[fit], self.R[fit], self.table.iloc[fit]
        out = np.zeros((len(F_q), R.shape[1]))
        if not len(fit):
            return out
        if name == "target_covariation":
            return self._covariation(lam, fit, q_table)
        if name != "neighbours":
            R = self._reduced(fit)
        if name.startswith("target_"):
            F, F_q = self._indicators(fit, q_table)
        if name.endswith("pooled_ridge"):
            return F_q @ ridge(F, R, lam)
        if name.endswith("grouped_ridge"):
            groups, q_groups = self._groups(table), self._groups(q_table)
            pooled = ridge(F, R, lam)
            for g in np.unique(q_groups):
                own = groups == g
                W = ridge(F[own], R[own], lam) if own.sum() >= 2 else pooled
                out[q_groups == g] = F_q[q_groups == g] @ W
            return out
        unit = lambda A: A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)  # noqa: E731
        sims = unit(F_q) @ unit(F).T
        slices, q_slices = self._slices(table), self._slices(q_table)
        for row in range(len(F_q)):
            candidates = np.flatnonzero(slices == q_slices[row])
            if not len(candidates):
                continue
            s = sims[row, candidates]
            top = np.argsort(-s, kind="stable")[: self.NEIGHBOURS]
            w = np.clip(s[top], 0.0, None)
            if w.sum() > 0:
                out[row] = (w / w.sum()) @ R[candidates[top]]
        return out

    def _out_of_fold(self, name: str, lam: float, folds: int = 5) -> np.ndarray:
        n = len(self.table)
        out = np.zeros_like(self.R)
        unit_of = self.table["perturbation"].to_numpy()
        units = np.random.default_rng(0).permutation(np.unique(unit_of))
        for k in range(min(folds, len(units))):
            held = np.flatnonzero(np.isin(unit_of, units[k::folds]))
            fit = np.setdiff1d(np.arange(n), held)
            out[held] = self._component(name, lam, fit, self.F[held], self.table.iloc[held])
        return out

    def _loss_weights(self, delta: np.ndarray) -> np.ndarray:
        """Per-entry weights of the plan's loss: its top-DE genes of each condition (by |Δ|) weighted up."""
        weights = np.ones_like(delta)
        if self.loss.get("de_weighting") == "top_de" and delta.size:
            top = np.argsort(-np.abs(delta), axis=1)[:, : int(self.loss["de_top_k"])]
            np.put_along_axis(weights, top, float(self.loss["de_weight"]), axis=1)
        return weights

    def fit(self, train: ConditionSet, F_train: np.ndarray, val: ConditionSet, F_val: np.ndarray) -> "BasePredictor":
        """λ per part and the stack's weights minimise the plan's loss (top-DE genes weighted up, as the
        network trains and the evaluator scores) over out-of-fold training and validation predictions."""
        self.table, self.delta, self.F = train.table, train.delta, F_train
        self.R = response_residuals(train.table, train.delta)
        self.targets = target_positions(train.table, self.pos)
        self._reduced_cache = {}
        R_val = val.delta - self._offsets(val.table) if len(val) else np.zeros((0, self.R.shape[1]))
        R_all = np.concatenate([self.R, R_val])
        weights = self._loss_weights(np.concatenate([train.delta, val.delta]) if len(val) else train.delta)
        everything = np.arange(len(train))
        annotated = any(self.targets)
        self.components = self.COMPONENTS + (self.TARGET_COMPONENTS if annotated else ())
        self.lam, fitted, scores = {}, {}, {}
        for name in self.components:
            for lam in self.lambdas if name != "neighbours" else [0.0]:
                o = self._out_of_fold(name, lam)
                v = self._component(name, lam, everything, F_val, val.table) if len(val) else R_val
                both = np.concatenate([o, v])
                scores[f"{name}:{lam:g}"] = float(np.sum(weights * (both - R_all) ** 2) / weights.sum())
                if name not in self.lam or scores[f"{name}:{lam:g}"] < scores[f"{name}:{self.lam[name]:g}"]:
                    self.lam[name], fitted[name] = lam, both
        root = np.sqrt(weights)
        stacked = np.stack([(root * fitted[n]).ravel() for n in self.components], axis=1)
        self.weights = nnls(stacked, (root * R_all).ravel())[0]
        self.oof = sum(w * fitted[n][: len(train)] for w, n in zip(self.weights, self.components))
        self.chosen = {"ridge_lambda": {n: self.lam[n] for n in self.components if n != "neighbours"},
                       "stack_weights": dict(zip(self.components, map(float, self.weights))),
                       "cv_loss": scores}
        return self

    def predict(self, conditions: ConditionSet, F: np.ndarray) -> np.ndarray:
        if not len(conditions):
            return np.zeros((0, self.delta.shape[1]))
        everything = np.arange(len(self.table))
        rest = sum(w * self._component(n, self.lam[n], everything, F, conditions.table)
                   for w, n in zip(self.weights, self.components) if w > 0)
        return self._offsets(conditions.table) + rest

    def out_of_fold(self, train: ConditionSet, F_train: np.ndarray) -> np.ndarray:
        """Base predictions of training conditions from fits that did not see them, so the residual
        network learns the base's generalisation error rather than its in-sample fit."""
        return self._offsets(train.table) + self.oof
