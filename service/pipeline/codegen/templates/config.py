"""The hyperparameters of the generated model, read from config.json into a typed, frozen `Config`.

Every key config.json holds is a field here; a key the file lacks or a key this class does not know is a
`ConfigError` that names it, so a typo never silently falls back to a default."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

LOSS_KEYS = ("kind", "pearson_weight", "de_weighting", "de_top_k", "de_weight")
# Not a hyperparameter: the service's record of which plan fields this code implements (checked service-side).
DECLARATION_KEYS = ("implements",)


class ConfigError(ValueError):
    """config.json does not describe a model this code can build."""


@dataclass(frozen=True)
class Config:
    perturbation_kind: str  # genetic, genetic_combo or chemical
    split_scheme: str  # what the split holds out; the base's folds hold out the same
    perturbation_encoder: str
    gene_embedding_source: Optional[str]  # pca or coexpression (gene encoders)
    embedding_dim: int
    combo_aggregation: Optional[str]  # sum or mean of a combination's gene vectors (gene_set)
    dose_encoding: Optional[str]  # log_hill or log_mlp (drug encoders)
    context_embedding: bool  # one-hot of the cell type / context in the network's input
    expression_encoder: str  # mean_control or control_sampling
    residual_delta: bool  # train a network on the base's residual (else the base alone)
    base_predictor: str  # none, mean_delta, linear_ridge or delta_transfer
    hidden_width: int
    depth: int
    dropout: float
    self_knockdown: bool  # pin a knocked-down gene's own Δ by the fitted knock-down curve
    ridge_lambdas: list[float]  # the grid each ridge's λ is chosen from, out of fold
    loss: dict[str, Any]  # the plan's loss: kind, pearson_weight, de_weighting, de_top_k, de_weight
    optimizer: str  # adam, adamw or sgd
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    early_stopping_patience: int
    grad_clip: Optional[float]
    seed: int
    device: str  # auto (CUDA when present) or cpu
    cell_sample: int  # training cells sampled for the gene embedding and the expression input

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k not in DECLARATION_KEYS}
        unknown = sorted(set(values) - set(fields))
        missing = sorted(set(fields) - set(values))
        if unknown or missing:
            raise ConfigError(f"config: unknown keys {unknown}, missing keys {missing}")
        loss = values["loss"]
        if not isinstance(loss, dict) or sorted(loss) != sorted(LOSS_KEYS):
            raise ConfigError(f"config: loss must hold exactly {list(LOSS_KEYS)}, got {loss!r}")
        for name in ("embedding_dim", "hidden_width", "depth", "batch_size", "epochs", "early_stopping_patience",
                     "seed", "cell_sample"):
            if not isinstance(values[name], int) or isinstance(values[name], bool):
                raise ConfigError(f"config: {name} must be an integer, got {values[name]!r}")
        for name in ("context_embedding", "residual_delta", "self_knockdown"):
            if not isinstance(values[name], bool):
                raise ConfigError(f"config: {name} must be true or false, got {values[name]!r}")
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> "Config":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)
