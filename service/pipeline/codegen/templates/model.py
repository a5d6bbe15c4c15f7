import numpy as np
import torch
from torch import nn

from components import BasePredictor, ExpressionInput, PerturbationEncoder, SelfEffect, Stack, context_onehot
from config import Config
from data import ConditionSet, conditions_to_predict, predictions_adata
from state import from_plain, to_plain

# The fitted components model.pt may hold, by class name (nothing else is rebuilt from it).
COMPONENTS = {cls.__name__: cls for cls in (BasePredictor, ConditionSet, ExpressionInput, PerturbationEncoder,
                                            SelfEffect, Stack)}
FORMAT = 1  # model.pt's layout version


def pick_device(config: Config) -> torch.device:
    """CUDA when present (and not pinned to cpu by the config), else cpu."""
    if config.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class ResidualMLP(nn.Module):
    """MLP from [perturbation features, expression input] to a Δ residual added to the base.
    The last layer starts at zero, so before training the model *is* the closed-form base."""

    def __init__(self, in_dim: int, n_genes: int, width: int, depth: int, dropout: float):
        super().__init__()
        self.in_dim = in_dim
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
    """Encoder + closed-form base + residual network: everything a prediction needs.

    `PerturbationModel.load("model.pt").predict(inputs)` predicts the conditions an inputs part lists
    (`uns["predict"]`, with its contexts' control cells) from model.pt alone, without the training data."""

    def __init__(self, config: Config, genes: list[str], controls: dict[str, np.ndarray]):
        """`controls`: each training context's mean control profile (a context the inputs do not bring
        control cells for is predicted from these)."""
        self.config = config
        self.genes = list(genes)
        self.controls = controls
        self.encoder = PerturbationEncoder(config)
        self.base = BasePredictor(config, self.genes)
        self.expression = ExpressionInput(config.embedding_dim, config.expression_encoder == "control_sampling")
        self.self_effect = SelfEffect(self.genes) if config.self_knockdown else None
        self.contexts: list[str] = []
        self.net: ResidualMLP | None = None

    def features(self, conditions: ConditionSet) -> np.ndarray:
        parts = [self.encoder.transform(conditions.table)]
        if self.config.context_embedding:
            parts.append(context_onehot(list(conditions.table["context"]), self.contexts))
        return np.concatenate(parts, axis=1)

    def fit_closed_form(self, train: ConditionSet, val: ConditionSet, cells: np.ndarray, contexts: np.ndarray,
                        is_control: np.ndarray, run_contexts: int | None = None) -> None:
        """`cells`: a sample of training cells (log-normalized), with their contexts and control flags;
        `run_contexts`: in a validation fold, how many contexts the run's test model trains on."""
        self.contexts = sorted(set(train.table["context"]))
        self.encoder.fit(train, self.genes, cells)
        self.expression.fit(cells[is_control], contexts[is_control])
        if self.self_effect is not None:
            self.self_effect.fit(train)
        self.base.fit(train, self.features(train), val, self.features(val), cells=cells, is_control=is_control,
                      self_effect=self.self_effect, run_contexts=run_contexts)

    def net_input(self, conditions: ConditionSet, rng: np.random.Generator | None = None) -> np.ndarray:
        x = np.concatenate([self.features(conditions), self.expression.transform(conditions, rng)], axis=1)
        return (x - self.x_mean) / self.x_scale

    def set_input_scaling(self, train: ConditionSet) -> None:
        x = np.concatenate([self.features(train), self.expression.transform(train)], axis=1)
        self.x_mean, self.x_scale = x.mean(axis=0), x.std(axis=0) + 1e-6

    def build_net(self, in_dim: int) -> "ResidualMLP":
        c = self.config
        self.net = ResidualMLP(in_dim, len(self.genes), c.hidden_width, c.depth, c.dropout)
        return self.net

    def predict_delta(self, conditions: ConditionSet) -> np.ndarray:
        """Base + residual. The residual is left out for contexts absent from training: the network never
        saw their inputs, and an unseen context is the closed-form base's job (transfer across contexts)."""
        delta = self.base.predict(conditions, self.features(conditions))
        if len(conditions) and self.net is not None and self.config.residual_delta:
            self.net.eval()
            with torch.no_grad():
                device = next(self.net.parameters()).device
                x = torch.as_tensor(self.net_input(conditions), dtype=torch.float32, device=device)
                residual = self.net(x).double().cpu().numpy()
            seen = conditions.table["context"].isin(self.contexts).to_numpy()
            delta = delta + residual * seen[:, None]
        if self.self_effect is not None:
            delta = self.self_effect.apply(conditions, delta)
        return delta

    def predict(self, inputs):
        """Predicted profiles of the conditions `inputs` (an AnnData like val_inputs.h5ad) lists, in the
        predictions format."""
        conditions = conditions_to_predict(inputs, self.controls)
        return predictions_adata(conditions, self.predict_delta(conditions), self.genes)

    # ----------------------------------------------------------------- model.pt

    FITTED = ("contexts", "encoder", "base", "expression", "self_effect", "x_mean", "x_scale")

    def save(self, path) -> None:
        """model.pt: the config, the genes, the training controls, every fitted matrix of the closed-form
        part (gene embedding, ridge fits and their λs, stack weights, input scaling) and the network."""
        fitted = {name: getattr(self, name, None) for name in self.FITTED}
        torch.save({"format": FORMAT, "config": self.config.to_dict(), "genes": self.genes,
                    "controls": to_plain(self.controls, COMPONENTS),
                    "fitted": to_plain(fitted, COMPONENTS),
                    "net": None if self.net is None else {
                        "in_dim": self.net.in_dim,
                        "state": {k: v.detach().cpu() for k, v in self.net.state_dict().items()}}},
                   path)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "PerturbationModel":
        """The model saved by `save`; reads tensors and plain data only (weights_only)."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") != FORMAT:
            raise ValueError(f"{path}: model.pt format {saved.get('format')!r}, this code reads {FORMAT}")
        model = cls.__new__(cls)
        model.config = Config.from_dict(saved["config"])
        model.genes = list(saved["genes"])
        model.controls = from_plain(saved["controls"], COMPONENTS)
        for name, value in from_plain(saved["fitted"], COMPONENTS).items():
            setattr(model, name, value)
        model.net = None
        if saved["net"] is not None:
            model.build_net(saved["net"]["in_dim"]).load_state_dict(saved["net"]["state"])
            model.net.to(device)
        return model
