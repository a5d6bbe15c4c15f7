class ExpressionInput:
    """The control profile of a condition's context, projected on the top principal components of
    control cells ({expression_encoder}: control_sampling draws the mean of a random half of the
    context's control cells per training example, mean_control uses the full mean)."""

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


class ResidualMLP(nn.Module):
    """MLP from [perturbation features, expression input] to a Δ residual added to the base.
    The last layer starts at zero, so before training the model *is* the closed-form base."""

    def __init__(self, in_dim: int, n_genes: int, width: int, depth: int, dropout: float):
        super().__init__()
        layers, last = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(last, width), nn.GELU(), nn.Dropout(dropout)]
            last = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(last, n_genes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def delta_loss(pred: torch.Tensor, true: torch.Tensor, loss_cfg: dict,
               reference: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error on Δ ({loss_kind}), the top-DE genes of each condition weighted up, plus
    pearson_weight × (1 − Pearson Δ) when the plan asks for it. With `reference` (the perturbed centroid
    Δ of each condition's context, `centroid_delta`) that Pearson is taken on Δ − reference, as the
    evaluator scores it: against the control, every prediction near the average response already
    correlates, and the term would reward moving towards it."""
    weights = torch.ones_like(true)
    if loss_cfg["de_weighting"] == "top_de":
        k = min(int(loss_cfg["de_top_k"]), true.shape[1])
        top = true.abs().topk(k, dim=1).indices
        weights.scatter_(1, top, float(loss_cfg["de_weight"]))
    loss = (weights * (pred - true) ** 2).sum() / weights.sum()
    if loss_cfg["kind"] == "mse_pearson_delta":
        if reference is not None:
            pred, true = pred - reference, true - reference
        pc = pred - pred.mean(dim=1, keepdim=True)
        tc = true - true.mean(dim=1, keepdim=True)
        r = (pc * tc).sum(dim=1) / (pc.norm(dim=1) * tc.norm(dim=1) + 1e-8)
        loss = loss + float(loss_cfg["pearson_weight"]) * (1.0 - r).mean()
    return loss


class PerturbationModel:
    """Encoder + closed-form base + residual network: everything a prediction needs."""

    def __init__(self, config: dict, genes: list[str]):
        self.config = config
        self.genes = list(genes)
        self.encoder = PerturbationEncoder(config)
        self.base = BasePredictor(config, self.genes)
        self.expression = ExpressionInput(int(config["embedding_dim"]),
                                          config["expression_encoder"] == "control_sampling")
        self.self_effect = SelfEffect(self.genes) if config.get("self_knockdown") else None
        self.contexts: list[str] = []
        self.net: ResidualMLP | None = None

    def features(self, conditions: ConditionSet) -> np.ndarray:
        parts = [self.encoder.transform(conditions.table)]
        if self.config["context_embedding"]:
            parts.append(context_onehot(list(conditions.table["context"]), self.contexts))
        return np.concatenate(parts, axis=1)

    def fit_closed_form(self, train: ConditionSet, val: ConditionSet, cells: np.ndarray, contexts: np.ndarray,
                        is_control: np.ndarray) -> None:
        """`cells`: a sample of training cells (log-normalized), with their contexts and control flags."""
        self.contexts = sorted(set(train.table["context"]))
        self.encoder.fit(train, self.genes, cells)
        self.expression.fit(cells[is_control], contexts[is_control])
        if self.self_effect is not None:
            self.self_effect.fit(train)
        self.base.fit(train, self.features(train), val, self.features(val), cells=cells, self_effect=self.self_effect)

    def net_input(self, conditions: ConditionSet, rng: np.random.Generator | None = None) -> np.ndarray:
        x = np.concatenate([self.features(conditions), self.expression.transform(conditions, rng)], axis=1)
        return (x - self.x_mean) / self.x_scale

    def set_input_scaling(self, train: ConditionSet) -> None:
        x = np.concatenate([self.features(train), self.expression.transform(train)], axis=1)
        self.x_mean, self.x_scale = x.mean(axis=0), x.std(axis=0) + 1e-6

    def build_net(self, in_dim: int) -> ResidualMLP:
        c = self.config
        self.net = ResidualMLP(in_dim, len(self.genes), int(c["hidden_width"]), int(c["depth"]), float(c["dropout"]))
        return self.net

    def predict_delta(self, conditions: ConditionSet, device: torch.device) -> np.ndarray:
        """Base + residual. The residual is left out for contexts absent from training: the network never
        saw their inputs, and an unseen context is the closed-form base's job (transfer across contexts)."""
        delta = self.base.predict(conditions, self.features(conditions))
        if len(conditions) and self.net is not None and self.config["residual_delta"]:
            self.net.eval()
            with torch.no_grad():
                x = torch.as_tensor(self.net_input(conditions), dtype=torch.float32, device=device)
                residual = self.net(x).double().cpu().numpy()
            seen = conditions.table["context"].isin(self.contexts).to_numpy()
            delta = delta + residual * seen[:, None]
        if self.self_effect is not None:
            delta = self.self_effect.apply(conditions, delta)
        return delta
