"""The documented design space: vetted components for every plan field, each with a when-to-use rule.

Offline experts propose by walking this table (first applicable option wins) and quote its argument;
LLM experts receive `document()` so both backends choose among the same vetted components. The rules
favour designs that start from a strong closed-form solution (ridge on PCA gene embeddings, mean Δ)
and learn a residual on top, since deep models that do not rarely beat those baselines
(Ahlmann-Eltze et al. 2025; Systema).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.agents.messages import FieldChoice, FieldValue
from service.agents.plan import TaskAnalysis
from service.agents.profile_facts import ProfileFacts

Rule = Callable[[ProfileFacts, TaskAnalysis], Any]


@dataclass(frozen=True)
class Option:
    value: FieldValue | Rule  # a constant, or a sizing rule computed from the facts
    when: str  # the documented when-to-use rule, in words
    applies: Rule  # the same rule as code
    because: Rule  # the argument, quoting the profile's numbers
    cards: tuple[str, ...] = ()


@dataclass(frozen=True)
class Component:
    field: str
    description: str
    options: tuple[Option, ...]  # ordered; the last one always applies


def _always(f: ProfileFacts, a: TaskAnalysis) -> bool:
    return True


def _pow2_floor(x: float) -> int:
    n = 1
    while n * 2 <= x:
        n *= 2
    return n


def _clip(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


def _n_hvg(f: ProfileFacts, a: TaskAnalysis) -> int:
    return _clip(min(2000, f.n_genes), 10, 20000)


def _is_genetic(f: ProfileFacts, a: TaskAnalysis) -> bool:
    return f.perturbation_kind in ("genetic", "genetic_combo")


def _gene_encoder(f: ProfileFacts, a: TaskAnalysis) -> bool:
    return _encoder(f, a) in ("gene_embedding", "gene_set")


def _encoder(f: ProfileFacts, a: TaskAnalysis) -> str:
    return next(o.value for o in _ENCODER.options if o.applies(f, a))  # type: ignore[return-value]


def _width(f: ProfileFacts, a: TaskAnalysis) -> int:
    return _clip(_pow2_floor(_n_hvg(f, a) / 4), 64, 1024)


_ENCODER = Component(
    "architecture.perturbation_encoder",
    "how a perturbation becomes a vector",
    (
        Option(
            "gene_set",
            "combinations (A+B): aggregate the single-gene embeddings so unseen combos of seen genes compose",
            lambda f, a: f.perturbation_kind == "genetic_combo",
            lambda f, a: f"{f.n_combos} combination conditions: a set encoder over single-gene embeddings "
            "composes unseen pairs and reduces to the additive model when interactions are absent",
            ("gears", "additive_combos"),
        ),
        Option(
            "gene_embedding",
            "genetic perturbations where test genes are unseen: embed the target gene from training data",
            lambda f, a: f.perturbation_kind == "genetic" and a.split_scheme == "unseen-perturbation",
            lambda f, a: f"{f.n_perturbations} knocked-down genes and the split holds out whole genes: a one-hot "
            "cannot represent an unseen gene, an embedding of the gene from PCA/co-expression of training "
            "cells can",
            ("gears", "linear_baseline", "genept"),
        ),
        Option(
            "drug_target_dose",
            "drugs held out as a whole and annotated with target genes that are measured: embed each drug by "
            "its targets' gene embeddings × dose",
            lambda f, a: f.perturbation_kind == "chemical" and a.split_scheme in ("unseen-drug", "unseen-perturbation")
            and bool(f.target_genes_measured_fraction),
            lambda f, a: f"{f.n_perturbations} drugs, test drugs unseen, and the data annotates their targets "
            f"({_measured(f)} of annotated target genes measured): a drug is placed by what it hits, the sum of "
            "its targets' gene embeddings scaled by the dose encoding",
            ("chemcpa", "linear_baseline", "dose_response"),
        ),
        Option(
            "drug_embedding_dose",
            "drugs held out as a whole: describe each drug by features (its response signature / targets) × dose",
            lambda f, a: f.perturbation_kind == "chemical" and a.split_scheme in ("unseen-drug", "unseen-perturbation"),
            lambda f, a: f"{f.n_perturbations} drugs and test drugs are unseen: a drug one-hot has no vector for "
            "them, a feature embedding scaled by the dose encoding does",
            ("chemcpa", "dose_response"),
        ),
        Option(
            "drug_onehot_dose",
            "drugs seen in training (held-out doses or contexts): drug one-hot × dose encoding",
            lambda f, a: f.perturbation_kind == "chemical",
            lambda f, a: f"{f.n_perturbations} drugs at {f.n_doses} doses, every test drug seen in training: "
            "identity one-hot times a dose-response encoding",
            ("cpa", "dose_response"),
        ),
        Option(
            "onehot",
            "perturbations all seen in training (new cell type / context): one vector per perturbation",
            _always,
            lambda f, a: f"{f.n_perturbations} perturbations, all present in training under split "
            f"{a.split_scheme}: a one-hot per perturbation suffices and the context carries the novelty",
            ("cpa", "scgen"),
        ),
    ),
)

DESIGN_SPACE: tuple[Component, ...] = (
    Component(
        "preprocessing.n_hvg",
        "genes the model predicts",
        (
            Option(
                _n_hvg,
                "2000 highly variable genes, or every gene when fewer are measured",
                _always,
                lambda f, a: f"{f.n_genes} measured genes: keep {_n_hvg(f, a)} highly variable ones, the usual "
                "signal-to-noise trade-off for pseudobulk Δ prediction",
            ),
        ),
    ),
    Component(
        "preprocessing.normalization",
        "expression scale the model sees",
        (
            Option(
                "log1p_cp10k",
                "raw counts: normalize_total 1e4 + log1p, the scale of the evaluator",
                lambda f, a: f.is_counts,
                lambda f, a: "X holds raw counts: normalize to 1e4 and log1p, the evaluator's scale",
            ),
            Option(
                "none",
                "already log-normalized: do not log twice",
                _always,
                lambda f, a: "X is already log-normalized; a second log1p would compress every Δ",
            ),
        ),
    ),
    Component(
        "preprocessing.modalities",
        "modalities the model reads",
        (
            Option(
                lambda f, a: list(f.modalities),
                "every modality the data holds",
                _always,
                lambda f, a: f"the data holds {', '.join(f.modalities)}; all are predicted",
            ),
        ),
    ),
    Component(
        "preprocessing.keep_perturbed_genes",
        "force target genes into the gene set",
        (
            Option(
                True,
                "genetic perturbations: the target's own knockdown is the most reliable signal",
                _is_genetic,
                lambda f, a: "targets of genetic perturbations must stay in the gene set: their own "
                f"knockdown is the strongest effect ({_measured(f)} of targets are measured)",
                ("gears",),
            ),
            Option(False, "drugs / cytokines have no target gene in the matrix", _always,
                   lambda f, a: f"{f.perturbation_kind} perturbations have no target gene to keep"),
        ),
    ),
    Component(
        "preprocessing.scale",
        "z-score genes",
        (
            Option(False, "never for Δ models scored on log-normalized Δ", _always,
                   lambda f, a: "metrics are computed on log-normalized Δ; z-scoring would re-weight genes "
                   "away from the scale that is scored"),
        ),
    ),
    Component(
        "architecture.expression_encoder",
        "how the control state enters the model",
        (
            Option(
                "control_sampling",
                "≥1000 control cells and ≥100 cells per condition: sample control cells per example",
                lambda f, a: f.n_control_cells >= 1000 and f.cells_per_condition_median >= 100,
                lambda f, a: f"{f.n_control_cells} control cells and a median of "
                f"{f.cells_per_condition_median:.0f} cells per condition: sampled controls add useful variation",
                ("state",),
            ),
            Option(
                "mean_control",
                "otherwise: the mean control profile of the context",
                _always,
                lambda f, a: f"{f.n_control_cells} control cells, median {f.cells_per_condition_median:.0f} "
                "cells per condition: the mean control profile per context is the stable input",
            ),
        ),
    ),
    _ENCODER,
    Component(
        "architecture.gene_embedding_source",
        "how gene vectors are built",
        (
            Option(
                "coexpression",
                "gene encoders with ≥2000 control cells: gene-gene co-expression is estimable",
                lambda f, a: _gene_encoder(f, a) and f.n_control_cells >= 2000,
                lambda f, a: f"{f.n_control_cells} control cells are enough to estimate gene-gene co-expression",
                ("gears",),
            ),
            Option(
                "pca",
                "gene encoders otherwise: loadings of the top PCs of training expression (as the ridge baseline)",
                _gene_encoder,
                lambda f, a: f"{f.n_control_cells} control cells: PCA loadings of training expression are the "
                "stable gene embedding (the linear baseline's, K≈10)",
                ("linear_baseline",),
            ),
            Option(None, "not a gene encoder", _always, lambda f, a: "the encoder does not embed genes"),
        ),
    ),
    Component(
        "architecture.combo_aggregation",
        "how single embeddings combine",
        (
            Option(
                "sum",
                "gene_set with <100 combos: sum (the additive prior; too few combos to learn the interaction)",
                lambda f, a: _encoder(f, a) == "gene_set" and f.n_combos < 100,
                lambda f, a: f"only {f.n_combos} combos: a sum of single embeddings keeps the additive prior",
                ("additive_combos",),
            ),
            Option(
                "mean",
                "gene_set with ≥100 combos: the mean of the genes' embeddings (one gene's scale; the network "
                "learns the interaction)",
                lambda f, a: _encoder(f, a) == "gene_set",
                lambda f, a: f"{f.n_combos} combos give enough pairs to learn the interaction on the mean embedding",
                ("gears",),
            ),
            Option(None, "not a set encoder", _always, lambda f, a: "no combinations to aggregate"),
        ),
    ),
    Component(
        "architecture.dose_encoding",
        "how dose scales a drug's effect",
        (
            Option(
                "log_hill",
                "drugs with ≤4 doses: Hill curve in log-dose (2 parameters per drug)",
                lambda f, a: _encoder(f, a).startswith("drug_") and f.n_doses <= 4,
                lambda f, a: f"{f.n_doses} doses per drug are too few for a free curve; a Hill curve in log-dose "
                "has only EC50 and slope",
                ("dose_response", "chemcpa"),
            ),
            Option(
                "log_mlp",
                "drugs with >4 doses: a small MLP on log-dose",
                lambda f, a: _encoder(f, a).startswith("drug_"),
                lambda f, a: f"{f.n_doses} doses support a learned monotone curve on log-dose",
                ("chemcpa",),
            ),
            Option(None, "no dose", _always, lambda f, a: "the data has no dose"),
        ),
    ),
    Component(
        "architecture.context_embedding",
        "a learned vector per cell type / line",
        (
            Option(
                True,
                "more than one context",
                lambda f, a: f.n_contexts > 1,
                lambda f, a: f"{f.n_contexts} contexts respond differently (cell-type-specific programs)",
                ("cytokine_dictionary", "cpa"),
            ),
            Option(False, "a single context", _always, lambda f, a: "one context: nothing to embed"),
        ),
    ),
    Component(
        "architecture.embedding_dim",
        "width of the perturbation embedding",
        (
            Option(
                lambda f, a: 32 if f.n_perturbations < 100 else 64,
                "32 below 100 perturbations, else 64",
                _always,
                lambda f, a: f"{f.n_perturbations} perturbations: a "
                f"{32 if f.n_perturbations < 100 else 64}-d embedding",
            ),
        ),
    ),
    Component(
        "architecture.decoder",
        "maps the joint embedding to Δ",
        (Option("mlp", "always an MLP on the concatenated embeddings", _always,
                lambda f, a: "an MLP decoder over [control, perturbation, context] embeddings"),),
    ),
    Component(
        "architecture.residual_delta",
        "predict Δ from control, not the profile",
        (Option(True, "always: every metric is on Δ", _always,
                lambda f, a: "every scored metric is on Δ vs control; predicting Δ keeps the control profile exact",
                ("systema",)),),
    ),
    Component(
        "architecture.base_predictor",
        "closed-form solution the network corrects",
        (
            Option(
                "delta_transfer",
                "unseen context: a stack of the perturbation's Δ where measured (delta transfer), the mean Δ, "
                "the pull toward the other contexts' profiles (context mean), and linear / kernel ridges of the "
                "Δ and of the perturbed profile on the context's control profile, their λ and widths and the "
                "stack's weights fitted leave-one-context-out",
                lambda f, a: a.split_scheme == "unseen-context",
                lambda f, a: f"the split holds out a context among {f.n_contexts}: each test perturbation was "
                "measured elsewhere, and its Δ there and the context's own control state are what place it; "
                "cell types respond according to their control state, which only held-out contexts can check",
                ("scgen", "linear_baseline"),
            ),
            Option(
                "linear_ridge",
                "≥10 training conditions: an out-of-fold stack of the baselines' recipes (mean Δ, PCA ridge, "
                "co-expression neighbours, feature ridges and neighbours; target ridges and co-variation for "
                "annotated compounds; a Hill dose curve for doses; additive for combinations), weighted on the "
                "plan's loss over held-out perturbations; the network learns the residual",
                lambda f, a: f.n_conditions >= 10,
                lambda f, a: f"{f.n_conditions} conditions support out-of-fold weights over the baselines' "
                "recipes, so the model starts at least at the best of the baselines it must beat and the network "
                "only has to learn what they miss",
                ("linear_baseline",),
            ),
            Option(
                "mean_delta",
                "fewer conditions: start from the mean training Δ",
                _always,
                lambda f, a: f"only {f.n_conditions} conditions: ridge is underdetermined, start from mean Δ",
                ("systema",),
            ),
        ),
    ),
    Component(
        "architecture.hidden_width",
        "MLP width",
        (
            Option(
                _width,
                "n_hvg/4 rounded down to a power of two, within 64–1024",
                _always,
                lambda f, a: f"{_n_hvg(f, a)} output genes: hidden width {_width(f, a)}",
            ),
        ),
    ),
    Component(
        "architecture.depth",
        "MLP hidden layers",
        (
            Option(3, "≥200 conditions", lambda f, a: f.n_conditions >= 200,
                   lambda f, a: f"{f.n_conditions} conditions support 3 hidden layers"),
            Option(2, "otherwise", _always, lambda f, a: f"{f.n_conditions} conditions: 2 hidden layers"),
        ),
    ),
    Component(
        "architecture.dropout",
        "dropout in the MLP",
        (Option(0.1, "0.1 by default; raise when targets are noisy", _always,
                lambda f, a: "light dropout 0.1 on a residual model"),),
    ),
    Component(
        "architecture.custom_components",
        "components outside this design space (an attention encoder, a graph prior, ...), implemented by the "
        "code generator within the generated-code contract; LLM mode only",
        (Option([], "none: the vetted components above; the offline rules never leave the vetted space", _always,
                lambda f, a: "the vetted components cover this task; no component outside the design space"),),
    ),
    Component("loss.kind", "training objective",
              (Option("mse", "MSE on Δ by default", _always, lambda f, a: "MSE on predicted Δ"),)),
    Component("loss.pearson_weight", "weight of (1 − Pearson Δ against the perturbed centroid)",
              (Option(0.0, "0 with plain MSE", _always, lambda f, a: "no correlation term with plain MSE"),)),
    Component("loss.de_weighting", "up-weight DE genes",
              (Option("none", "uniform by default", _always, lambda f, a: "uniform gene weights"),)),
    Component("loss.de_top_k", "DE genes per condition",
              (Option(20, "20, matching the evaluator's top-20 DE metrics", _always,
                      lambda f, a: "top-20 DE genes, as the evaluator ranks them"),)),
    Component("loss.de_weight", "multiplier on DE genes",
              (Option(1.0, "1 when not weighting", _always, lambda f, a: "no extra weight"),)),
    Component("training.optimizer", "optimiser",
              (Option("adamw", "AdamW (decoupled weight decay)", _always,
                      lambda f, a: "AdamW: decoupled weight decay regularises the residual network"),)),
    Component("training.lr", "learning rate",
              (Option(1e-3, "1e-3 for AdamW on an MLP", _always, lambda f, a: "lr 1e-3, standard for AdamW MLPs"),)),
    Component("training.weight_decay", "weight decay",
              (Option(1e-4, "1e-4 by default", _always, lambda f, a: "weight decay 1e-4"),)),
    Component(
        "training.batch_size",
        "training examples per step",
        (
            Option(
                lambda f, a: _clip(_pow2_floor(f.n_cells / 20), 16, 512),
                "n_cells/20 rounded down to a power of two, within 16–512",
                _always,
                lambda f, a: f"{f.n_cells} cells: batch {_clip(_pow2_floor(f.n_cells / 20), 16, 512)} gives ≥20 "
                "steps per epoch",
            ),
        ),
    ),
    Component(
        "training.epochs",
        "maximum epochs (early stopping decides)",
        (
            Option(100, "≥20000 cells", lambda f, a: f.n_cells >= 20000,
                   lambda f, a: f"{f.n_cells} cells: 100 epochs cap"),
            Option(200, "otherwise", _always, lambda f, a: f"{f.n_cells} cells: 200 epochs cap"),
        ),
    ),
    Component("training.early_stopping_patience", "epochs without val improvement",
              (Option(20, "20 epochs on validation loss", _always,
                      lambda f, a: "stop after 20 epochs without validation improvement"),)),
    Component("training.grad_clip", "gradient norm clip",
              (Option(1.0, "1.0", _always, lambda f, a: "clip gradient norm at 1.0 for stable early epochs"),)),
    Component("training.seed", "random seed",
              (Option(0, "fixed seed 0", _always, lambda f, a: "fixed seed for a reproducible run"),)),
    Component("evaluation.split_scheme", "held-out structure",
              (Option(lambda f, a: a.split_scheme, "the task analysis's split", _always,
                      lambda f, a: f"the task asks for {a.split_scheme} generalisation"),)),
    Component("evaluation.metrics", "reported metrics",
              (Option(lambda f, a: list(a.metrics), "the task analysis's metrics", _always,
                      lambda f, a: "the evaluator's Δ-based metrics, Systema's included", ("systema",)),)),
    Component("evaluation.primary_metric", "metric that selects the model",
              (Option(lambda f, a: a.primary_metric, "the task analysis's primary metric", _always,
                      lambda f, a: f"{a.primary_metric}: resists systematic variation", ("systema",)),)),
    Component("evaluation.baselines", "baselines to beat",
              (Option(lambda f, a: list(a.baselines), "the task analysis's baselines", _always,
                      lambda f, a: f"the model must beat {', '.join(a.baselines)}", ("linear_baseline",)),)),
)

COMPONENTS: dict[str, Component] = {c.field: c for c in DESIGN_SPACE}


def _measured(f: ProfileFacts) -> str:
    frac = f.target_genes_measured_fraction
    return "an unknown share" if frac is None else f"{frac:.0%}"


def choose(field: str, facts: ProfileFacts, analysis: TaskAnalysis) -> FieldChoice:
    """The first applicable vetted option for `field`, with its argument."""
    component = COMPONENTS[field]
    for option in component.options:
        if option.applies(facts, analysis):
            value = option.value(facts, analysis) if callable(option.value) else option.value
            argument = option.because(facts, analysis)
            if option.cards:
                argument += f" [cards: {', '.join(option.cards)}]"
            return FieldChoice(field=field, value=value, argument=argument)
    raise AssertionError(f"design space for {field} has no default option")  # the table guarantees one


def document() -> list[dict[str, Any]]:
    """The design space in words, for LLM prompts."""
    return [
        {
            "field": c.field,
            "description": c.description,
            "options": [
                {"value": "computed" if callable(o.value) else o.value, "when": o.when, "cards": list(o.cards)}
                for o in c.options
            ],
        }
        for c in DESIGN_SPACE
    ]
