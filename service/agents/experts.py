"""The expert roles of the Method Design discussion and the plan fields each one is answerable for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Expert:
    id: str
    title: str
    focus: str
    remit: tuple[str, ...]  # the "section.field"s this expert proposes; the critic has none


DATA_ENGINEER = Expert(
    "data_engineer",
    "Data engineering",
    "gene selection, normalization, modalities and how control cells feed the model",
    (
        "preprocessing.n_hvg",
        "preprocessing.normalization",
        "preprocessing.modalities",
        "preprocessing.keep_perturbed_genes",
        "preprocessing.scale",
        "architecture.expression_encoder",
    ),
)
BIOLOGIST = Expert(
    "biologist",
    "Single-cell biology",
    "how the perturbation acts (gene target, drug and dose, cytokine in a cell type) and how to encode it",
    (
        "architecture.perturbation_encoder",
        "architecture.gene_embedding_source",
        "architecture.combo_aggregation",
        "architecture.dose_encoding",
        "architecture.context_embedding",
    ),
)
DL_ARCHITECT = Expert(
    "dl_architect",
    "Deep-learning architecture",
    "model capacity, residual structure over a closed-form base predictor, regularisation, and (LLM mode) "
    "components outside the design space",
    (
        "architecture.embedding_dim",
        "architecture.decoder",
        "architecture.residual_delta",
        "architecture.base_predictor",
        "architecture.hidden_width",
        "architecture.depth",
        "architecture.dropout",
        "architecture.custom_components",
    ),
)
TRAINING = Expert(
    "training",
    "Training and optimisation",
    "loss, optimiser, schedule, early stopping and reproducibility",
    (
        "loss.kind",
        "loss.pearson_weight",
        "loss.de_weighting",
        "loss.de_top_k",
        "loss.de_weight",
        "training.optimizer",
        "training.lr",
        "training.weight_decay",
        "training.batch_size",
        "training.epochs",
        "training.early_stopping_patience",
        "training.grad_clip",
        "training.seed",
    ),
)
STATISTICIAN = Expert(
    "statistician",
    "Statistics and evaluation",
    "split scheme, metrics that resist systematic variation, baselines the model must beat",
    ("evaluation.split_scheme", "evaluation.metrics", "evaluation.primary_metric", "evaluation.baselines"),
)
CRITIC = Expert(
    "critic",
    "Critic",
    "weak points of every proposal against the data profile; scores each proposal",
    (),
)

PROPOSERS: tuple[Expert, ...] = (DATA_ENGINEER, BIOLOGIST, DL_ARCHITECT, TRAINING, STATISTICIAN)
ALL_EXPERTS: dict[str, Expert] = {e.id: e for e in (*PROPOSERS, CRITIC)}


def owner_of(field: str) -> Expert:
    for expert in PROPOSERS:
        if field in expert.remit:
            return expert
    raise KeyError(f"no expert owns plan field {field!r}")
