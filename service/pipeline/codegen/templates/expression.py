class ExpressionInput:
    """The control profile of a condition's context, projected on the top principal components of
    control cells ({expression_encoder}: control_sampling draws the mean of a random half of the
    context's control cells per training example, mean_control uses the full mean)."""

    TRANSIENT = ("cells",)  # training's control cells, drawn from per example; a prediction uses the means

    def __init__(self, dim: int, sampling: bool):
        self.dim, self.sampling = dim, sampling

    def fit(self, control_cells: np.ndarray, contexts: np.ndarray) -> "ExpressionInput":
        self.centre = control_cells.mean(axis=0)
        k = max(1, min(self.dim, control_cells.shape[0] - 1, control_cells.shape[1]))
        self.components = np.linalg.svd(control_cells - self.centre, full_matrices=False)[2][:k]
        self.cells = {c: control_cells[contexts == c] for c in np.unique(contexts)}
        return self

    def transform(self, conditions: ConditionSet, rng: np.random.Generator | None = None) -> np.ndarray:
        profiles = conditions.control
        if self.sampling and rng is not None:
            profiles = profiles.copy()
            for row, context in enumerate(conditions.table["context"]):
                cells = self.cells.get(context)
                if cells is not None and len(cells) > 1:
                    half = rng.choice(len(cells), size=max(1, len(cells) // 2), replace=False)
                    profiles[row] = cells[half].mean(axis=0)
        return (profiles - self.centre) @ self.components.T
