"""Rule-based experts for the offline LLM backend: `handlers()` answers every agent request kind from
its `context` alone (deterministic, no network), with the same message models an LLM returns.

Proposals walk the design space (`design_space.choose`) for the expert's remit; revisions adopt the
objections received with severity ≥ `ACCEPT_SEVERITY` that carry a suggested value. Critiques and the
critic's scores come from `CRITIQUE_RULES`: each rule is one cross-domain concern an author raises,
grounded in the profile's numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.agents import design_space
from service.agents.experts import ALL_EXPERTS
from service.agents.llm_kinds import CRITIC_SCORES, EXPERT_CRITIQUE, EXPERT_PROPOSAL, TASK_ANALYSIS
from service.agents.messages import (
    Critique,
    CritiqueItem,
    CriticScores,
    ExpertProposal,
    FieldChoice,
    FieldValue,
    ProposalScore,
)
from service.agents.plan import (
    ArgumentRef,
    CardCitation,
    Loss,
    MetricName,
    Preprocessing,
    Risk,
    SplitScheme,
    TaskAnalysis,
)
from service.agents.profile_facts import ProfileFacts

ACCEPT_SEVERITY = 0.5  # objections at or above this, with a suggested value, are adopted on revision
SCORE_PENALTY = 0.4  # critic score = 1 − SCORE_PENALTY × Σ severity of the critic's objections
FEW_CELLS = 50  # median cells per condition below which pseudobulk targets are noisy
FEW_CONDITIONS = 30  # conditions below which a deep MLP memorises the training perturbations
MIN_CARD_SCORE = 0.05  # method cards retrieved below this similarity are not cited


# ---------------------------------------------------------------- task analysis


_SPLIT_WORDS: list[tuple[str, SplitScheme]] = [
    (r"(unseen|new|novel|held[- ]out|other) (cell[ -]?types?|contexts?|cell[ -]?lines?|donors?)|"
     r"across cell[ -]?types?", "unseen-context"),
    (r"(unseen|held[- ]out|intermediate|new) doses?", "unseen-dose"),
    (r"(unseen|new|novel|held[- ]out) (drugs?|compounds?)", "unseen-drug"),
    # "unseen gene pairs", "double CRISPR knockouts": a word may sit between, as for single perturbations below.
    (r"(unseen|new|novel|held[- ]out) ([\w-]+ )?(combination|combo|pair)s?|"
     r"double ([\w-]+ )?(perturbations?|knockouts?|knockdowns?)|combinations? of", "combo"),
    (r"(unseen|novel|held[- ]out|new) ([\w-]+ )?(genes?|perturbations?|knockouts?|knockdowns?|cytokines?)",
     "unseen-perturbation"),
]
_KIND_DEFAULT_SPLIT: dict[str, SplitScheme] = {
    "genetic": "unseen-perturbation", "genetic_combo": "combo", "chemical": "unseen-drug",
    "cytokine": "unseen-perturbation",
}

_RNA_METRICS: list[MetricName] = [
    "mse", "pearson", "pearson_delta", "pearson_delta_pert", "mse_top20_de", "pearson_delta_top20_de",
    "r2_delta", "direction_acc_top20_de", "discrimination_l1",
]


def _split_scheme(facts: ProfileFacts, task_text: str) -> tuple[SplitScheme, str]:
    """The split the task text asks for when the data allows it; else the data layer's recommendation."""
    feasible = [s for s in [facts.recommended_split, *facts.alternative_splits] if s is not None]
    text = task_text.lower()
    for pattern, scheme in _SPLIT_WORDS:
        match = re.search(pattern, text)
        if match and (scheme in feasible or not feasible):
            if scheme == "unseen-context" and facts.n_contexts < 2:
                continue
            return scheme, f"the task says {match.group(0)!r}"
    if facts.recommended_split is not None:
        return facts.recommended_split, "the data profile's recommended split"
    if facts.perturbation_kind == "cytokine" and facts.n_contexts > 1:
        return "unseen-context", f"{facts.n_contexts} cell types: predict a cytokine's effect in a held-out one"
    return _KIND_DEFAULT_SPLIT[facts.perturbation_kind], f"the usual split for {facts.perturbation_kind} data"


def _risks(f: ProfileFacts, scheme: SplitScheme) -> list[Risk]:
    risks = [Risk(code="systematic_variation", severity="medium",
                  description="perturbed cells share a systematic shift from control; Pearson Δ vs control "
                              "rewards predicting the average effect — judge on Δ vs perturbed centroid")]
    if f.cells_per_condition_median < FEW_CELLS:
        risks.append(Risk(code="few_cells_per_condition", severity="high",
                          description=f"median {f.cells_per_condition_median:.0f} cells per condition "
                                      f"(min {f.cells_per_condition_min:.0f}): noisy pseudobulk targets, overfitting"))
    if f.n_conditions < FEW_CONDITIONS:
        risks.append(Risk(code="few_conditions", severity="high",
                          description=f"only {f.n_conditions} perturbed conditions to learn from"))
    if f.n_control_cells < 200:
        risks.append(Risk(code="few_control_cells", severity="medium",
                          description=f"{f.n_control_cells} control cells: the control mean is noisy"))
    frac = f.target_genes_measured_fraction
    if f.perturbation_kind in ("genetic", "genetic_combo") and frac is not None and frac < 0.9:
        risks.append(Risk(code="targets_not_measured", severity="medium",
                          description=f"only {frac:.0%} of target genes are measured; their knockdown is invisible"))
    if f.perturbation_kind == "chemical" and f.n_doses < 3:
        risks.append(Risk(code="few_doses", severity="medium",
                          description=f"{f.n_doses} doses: a dose-response curve is barely identifiable"))
    if scheme == "unseen-context" and f.n_contexts < 3:
        risks.append(Risk(code="few_contexts", severity="high",
                          description=f"{f.n_contexts} contexts to transfer from"))
    return risks


def task_analysis(context: dict[str, Any]) -> TaskAnalysis:
    facts = ProfileFacts.model_validate(context["facts"])
    task_text: str = context["task_text"]
    scheme, scheme_why = _split_scheme(facts, task_text)
    metrics: list[MetricName] = list(_RNA_METRICS)
    if facts.cells_per_condition_median >= 30:
        metrics.append("de_overlap")
    if "atac" in facts.modalities:
        metrics += ["atac_roc_auc", "atac_pr_auc"]
    baselines = ["control", "mean_delta", "linear_pca_ridge"]
    if facts.perturbation_kind in ("genetic", "genetic_combo"):
        baselines.append("gene_similarity")  # co-expression neighbours: often the strongest for unseen genes
    if facts.perturbation_kind == "genetic_combo":
        baselines.append("additive")
    if scheme == "unseen-dose":
        baselines.append("dose_interpolation")
    if facts.n_contexts > 1:
        baselines.append("context_mean")
    if scheme == "unseen-context":
        baselines += ["delta_transfer", "linear_context_ridge"]
    if facts.perturbation_kind == "chemical" and facts.target_genes_measured_fraction:
        baselines.append("drug_target_ridge")  # annotated targets: the linear reference a target encoder must beat
    citations = [
        CardCitation(card_id=c["id"], score=min(1.0, max(0.0, c["score"])),
                     why=f"{c['name']} applies to {facts.perturbation_kind} data: {c['when_to_use']}")
        for c in context["cards"]
        if facts.perturbation_kind in c["applies_to"] and (c["role"] == "evaluation" or c["score"] >= MIN_CARD_SCORE)
    ]
    what = {
        "genetic": "a genetic perturbation (knockout/knockdown)",
        "genetic_combo": "a combination of genetic perturbations",
        "chemical": "a drug at a given dose",
        "cytokine": "a cytokine stimulation",
    }[facts.perturbation_kind]
    key_numbers = {k: float(v) for k, v in facts.model_dump().items() if isinstance(v, int | float) and v is not None}
    return TaskAnalysis(
        problem_definition=(
            f"Predict the mean log-normalized expression profile (pseudobulk) of cells under {what} from "
            f"control cells, for held-out conditions ({scheme}; {scheme_why}). Data: {facts.n_cells} cells, "
            f"{facts.n_genes} genes, {facts.n_perturbations} perturbations in {facts.n_conditions} conditions, "
            f"{facts.n_contexts} context(s). Task: {task_text.strip()}"
        ),
        perturbation_kind=facts.perturbation_kind,
        modalities=list(facts.modalities),
        split_scheme=scheme,
        metrics=metrics,
        primary_metric="pearson_delta_pert",
        baselines=baselines,
        risks=_risks(facts, scheme),
        preprocessing=Preprocessing(
            n_hvg=min(2000, max(10, facts.n_genes)),
            normalization="log1p_cp10k" if facts.is_counts else "none",
            modalities=list(facts.modalities),
            keep_perturbed_genes=facts.perturbation_kind in ("genetic", "genetic_combo"),
            scale=False,
        ),
        cited_cards=citations,
        key_numbers=key_numbers,
    )


# ---------------------------------------------------------------- critique rules


@dataclass(frozen=True)
class Objection:
    severity: float
    argument: str
    suggestions: dict[str, FieldValue]


Check = Callable[[ProfileFacts, TaskAnalysis, dict[str, FieldValue]], Objection | None]


@dataclass(frozen=True)
class CritiqueRule:
    author: str
    fields: tuple[str, ...]  # the rule speaks to a proposal that sets any of these
    support: str  # what the author says when the check passes
    check: Check
    kinds: tuple[str, ...] = ("genetic", "genetic_combo", "chemical", "cytokine")  # data it is relevant to


def _few_cells(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    width, dropout = v.get("architecture.hidden_width"), v.get("architecture.dropout")
    if f.cells_per_condition_median >= FEW_CELLS or width is None or dropout is None:
        return None
    if width <= 128 and dropout >= 0.3:  # type: ignore[operator]
        return None
    return Objection(
        0.8,
        f"median {f.cells_per_condition_median:.0f} cells per condition (< {FEW_CELLS}): pseudobulk targets are "
        f"noisy and a {width}-wide MLP with dropout {dropout} will fit that noise; narrow it to 128 and raise "
        "dropout to 0.3",
        {"architecture.hidden_width": min(int(width), 128),  # type: ignore[arg-type]
         "architecture.dropout": max(float(dropout), 0.3)},  # type: ignore[arg-type]
    )


def _few_conditions(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    depth = v.get("architecture.depth")
    if f.n_conditions >= FEW_CONDITIONS or depth is None or depth <= 1:  # type: ignore[operator]
        return None
    return Objection(
        0.6,
        f"only {f.n_conditions} training conditions: {depth} hidden layers memorise them; one layer on top of the "
        "base predictor is enough",
        {"architecture.depth": 1},
    )


def _noisy_weight_decay(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    wd = v.get("training.weight_decay")
    if f.cells_per_condition_median >= FEW_CELLS or wd is None or wd >= 1e-3:  # type: ignore[operator]
        return None
    return Objection(
        0.5,
        f"median {f.cells_per_condition_median:.0f} cells per condition: raise weight decay from {wd} to 1e-3 so "
        "the residual stays close to the base predictor",
        {"training.weight_decay": 1e-3},
    )


def _onehot_unseen(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    enc = v.get("architecture.perturbation_encoder")
    if a.split_scheme not in ("unseen-perturbation", "unseen-drug") or enc not in ("onehot", "drug_onehot_dose"):
        return None
    annotated = bool(f.target_genes_measured_fraction)
    better = {"genetic": "gene_embedding",
              "chemical": "drug_target_dose" if annotated else "drug_embedding_dose"}.get(f.perturbation_kind)
    return Objection(
        1.0,
        f"split {a.split_scheme}: test perturbations are absent from training, so a {enc} encoder has no "
        "vector for them and collapses to the mean",
        {"architecture.perturbation_encoder": better} if better else {},
    )


def _normalization(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    norm = v.get("preprocessing.normalization")
    if norm is None or (norm == "log1p_cp10k") == f.is_counts:
        return None
    want = "log1p_cp10k" if f.is_counts else "none"
    state = "raw counts" if f.is_counts else "already log-normalized"
    return Objection(1.0, f"X is {state}; normalization {norm!r} puts the model off the evaluator's scale",
                     {"preprocessing.normalization": want})


def _patience(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    epochs, patience = v.get("training.epochs"), v.get("training.early_stopping_patience")
    if epochs is None or patience is None or patience < epochs:  # type: ignore[operator]
        return None
    return Objection(0.6, f"patience {patience} ≥ {epochs} epochs: early stopping never triggers",
                     {"training.early_stopping_patience": max(5, int(epochs) // 10)})  # type: ignore[arg-type]


def _systema_metric(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    primary, baselines = v.get("evaluation.primary_metric"), v.get("evaluation.baselines")
    suggestions: dict[str, FieldValue] = {}
    reasons = []
    if primary is not None and primary not in ("pearson_delta_pert", "pearson_delta_top20_de", "mse_top20_de"):
        suggestions["evaluation.primary_metric"] = "pearson_delta_pert"
        reasons.append(f"primary metric {primary} is inflated by systematic variation (Systema)")
    if isinstance(baselines, list) and not {"mean_delta", "linear_pca_ridge"} <= set(baselines):
        suggestions["evaluation.baselines"] = sorted({str(b) for b in baselines} | {"mean_delta", "linear_pca_ridge"})
        reasons.append("mean Δ and linear ridge are the baselines deep models most often fail to beat")
    if not reasons:
        return None
    return Objection(0.6, "; ".join(reasons), suggestions)


def _de_loss(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    if v.get("loss.de_weighting") != "none" or "mse_top20_de" not in a.metrics:
        return None
    share = f.de_top20_fraction
    n_hvg = v.get("preprocessing.n_hvg") or min(2000, f.n_genes)
    carried = f"carry {share:.0%} of a condition's |Δ|" if share is not None else "carry most of the effect"
    suggestions: dict[str, FieldValue] = {
        "loss.de_weighting": "top_de", "loss.de_top_k": 20, "loss.de_weight": 5.0,
    }
    hedge = ""
    if a.primary_metric.startswith("pearson_delta") and v.get("loss.kind") == "mse":
        weight = Loss.DEFAULT_PEARSON_WEIGHT
        if a.split_scheme == "unseen-perturbation" and a.perturbation_kind == "genetic":
            weight = Loss.UNMEASURED_STRENGTH_PEARSON_WEIGHT
            hedge = (f" at weight {weight:g}, as strongly as the squared error: how far a held-out gene's "
                     "knockdown moves the others was measured nowhere, and under that doubt the Pearson term "
                     "hedges between the average response and none where the squared error fits the average")
        suggestions |= {"loss.kind": "mse_pearson_delta", "loss.pearson_weight": weight}
    return Objection(
        0.7,
        f"the evaluator scores MSE and Pearson Δ on the top-20 DE genes, which {carried} but are 20 of "
        f"{n_hvg} genes: a uniform MSE spends the model on near-null genes; weight each condition's top-20 DE "
        f"genes ×5 and add a Pearson-Δ term for the primary metric {a.primary_metric}{hedge}",
        suggestions,
    )


def _residual(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    suggestions: dict[str, FieldValue] = {}
    if v.get("architecture.base_predictor") == "none":
        suggestions["architecture.base_predictor"] = (
            "delta_transfer" if a.split_scheme == "unseen-context"
            else "linear_ridge" if f.n_conditions >= 10 else "mean_delta")
    if v.get("architecture.residual_delta") is False:
        suggestions["architecture.residual_delta"] = True
    if not suggestions:
        return None
    return Objection(0.8, f"the baselines to beat ({', '.join(a.baselines)}) are closed-form; start from one "
                          "and learn the residual Δ, or the network must first rediscover them", suggestions)


def _targets_kept(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    if v.get("preprocessing.keep_perturbed_genes") is not False:
        return None
    return Objection(0.7, "the knocked-down target is the strongest and most reliable effect; HVG selection can "
                          "drop it, so force target genes into the gene set",
                     {"preprocessing.keep_perturbed_genes": True})


def _mean_few_combos(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    if v.get("architecture.combo_aggregation") != "mean" or f.n_combos >= 100:
        return None
    return Objection(0.6, f"{f.n_combos} combos are too few to learn the interaction a mean embedding leaves to the "
                          "network; sum keeps the additive prior",
                     {"architecture.combo_aggregation": "sum"})


def _coexpression_few_controls(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    if v.get("architecture.gene_embedding_source") != "coexpression" or f.n_control_cells >= 2000:
        return None
    return Objection(0.6, f"co-expression from {f.n_control_cells} control cells is unstable; use PCA loadings",
                     {"architecture.gene_embedding_source": "pca"})


def _lr(f: ProfileFacts, a: TaskAnalysis, v: dict[str, FieldValue]) -> Objection | None:
    lr = v.get("training.lr")
    if lr is None or lr <= 3e-3:  # type: ignore[operator]
        return None
    return Objection(0.6, f"lr {lr} is high for a residual MLP over a fitted base predictor: it undoes the base "
                          "solution in the first epochs", {"training.lr": 1e-3})


CRITIQUE_RULES: tuple[CritiqueRule, ...] = (
    CritiqueRule("critic", ("architecture.hidden_width", "architecture.dropout"),
                 "capacity matches the cells per condition", _few_cells),
    CritiqueRule("critic", ("architecture.depth",), "depth matches the number of conditions", _few_conditions),
    CritiqueRule("critic", ("training.weight_decay",), "regularisation suits the noise level", _noisy_weight_decay),
    CritiqueRule("critic", ("architecture.perturbation_encoder",), "the encoder can represent test perturbations",
                 _onehot_unseen),
    CritiqueRule("critic", ("preprocessing.normalization",), "normalization matches X", _normalization),
    CritiqueRule("critic", ("training.early_stopping_patience",), "early stopping can trigger", _patience),
    CritiqueRule("critic", ("evaluation.primary_metric", "evaluation.baselines"),
                 "the evaluation resists systematic variation", _systema_metric),
    CritiqueRule("statistician", ("loss.de_weighting",), "the loss matches the DE-gene metrics", _de_loss),
    CritiqueRule("statistician", ("architecture.base_predictor", "architecture.residual_delta"),
                 "the model starts from a baseline it must beat", _residual),
    CritiqueRule("dl_architect", ("training.lr",), "the learning rate suits a residual model", _lr),
    CritiqueRule("dl_architect", ("architecture.combo_aggregation",), "aggregation fits the number of combos",
                 _mean_few_combos),
    CritiqueRule("biologist", ("preprocessing.keep_perturbed_genes",), "target genes stay measured", _targets_kept,
                 kinds=("genetic", "genetic_combo")),
    CritiqueRule("data_engineer", ("architecture.gene_embedding_source",),
                 "the gene embedding is estimable from the controls", _coexpression_few_controls),
)


def _items(author: str, facts: ProfileFacts, analysis: TaskAnalysis, target_fields: set[str],
            values: dict[str, FieldValue]) -> list[CritiqueItem]:
    items: list[CritiqueItem] = []
    for rule in CRITIQUE_RULES:
        if rule.author != author or not target_fields & set(rule.fields) or facts.perturbation_kind not in rule.kinds:
            continue
        if all(values.get(f) is None for f in rule.fields):
            continue  # the component the rule judges is not in this plan (e.g. no combos to aggregate)
        objection = rule.check(facts, analysis, values)
        field = next(f for f in rule.fields if f in target_fields)
        if objection is None:
            items.append(CritiqueItem(field=field, stance="support", severity=0.0, argument=rule.support))
        elif not objection.suggestions:
            items.append(CritiqueItem(field=field, stance="object", severity=objection.severity,
                                      argument=objection.argument))
        else:
            items += [
                CritiqueItem(field=f, stance="object", severity=objection.severity, argument=objection.argument,
                             suggested_value=value)
                for f, value in objection.suggestions.items()
            ]
    return items


def expert_critique(context: dict[str, Any]) -> Critique:
    facts = ProfileFacts.model_validate(context["facts"])
    analysis = TaskAnalysis.model_validate(context["analysis"])
    proposal = ExpertProposal.model_validate(context["proposal"])
    # Rules read the whole draft (a width is judged with the dropout beside it), the target's values first.
    values = {**context.get("draft", {}), **proposal.values()}
    return Critique(items=_items(context["author"], facts, analysis, set(proposal.values()), values))


def critic_scores(context: dict[str, Any]) -> CriticScores:
    facts = ProfileFacts.model_validate(context["facts"])
    analysis = TaskAnalysis.model_validate(context["analysis"])
    draft: dict[str, FieldValue] = context.get("draft", {})
    scores = []
    for expert_id, raw in context["proposals"].items():
        proposal = ExpertProposal.model_validate(raw)
        items = _items("critic", facts, analysis, set(proposal.values()), {**draft, **proposal.values()})
        objections = [i for i in items if i.stance == "object"]
        # One concern may object to several fields; it is penalised once.
        penalty = sum({i.argument: i.severity for i in objections}.values())
        scores.append(ProposalScore(expert=expert_id, score=max(0.0, min(1.0, 1.0 - SCORE_PENALTY * penalty)),
                                    reasons=sorted({i.argument for i in objections}) or ["no weak point found"]))
    return CriticScores(scores=scores)


# ---------------------------------------------------------------- proposals


def expert_proposal(context: dict[str, Any]) -> ExpertProposal:
    expert = ALL_EXPERTS[context["expert"]]
    facts = ProfileFacts.model_validate(context["facts"])
    analysis = TaskAnalysis.model_validate(context["analysis"])
    previous = context.get("previous")
    if previous is None:
        choices = [design_space.choose(field, facts, analysis) for field in expert.remit]
        thin = facts.cells_per_condition_median < FEW_CELLS or facts.n_conditions < FEW_CONDITIONS
        return ExpertProposal(
            summary=f"{expert.title}: vetted components for {facts.perturbation_kind} data, split "
                    f"{analysis.split_scheme}",
            choices=choices,
            confidence=0.6 if thin else 0.7,
        )
    prior = ExpertProposal.model_validate(previous)
    by_field = {c.field: c for c in prior.choices}
    adopted = []
    for critique in context.get("critiques", []):
        for item in critique["items"]:
            if (item["stance"] == "object" and item["severity"] >= ACCEPT_SEVERITY
                    and item.get("suggested_value") is not None and item["field"] in by_field
                    and by_field[item["field"]].value != item["suggested_value"]):
                by_field[item["field"]] = FieldChoice(
                    field=item["field"], value=item["suggested_value"],
                    argument=f"adopted from {critique['author']}: {item['argument']}",
                    source=ArgumentRef(round=critique["round"], expert=critique["author"],
                                       message_id=critique["message_id"], summary=item["argument"][:2000]),
                )
                adopted.append(item["field"])
    summary = (f"{expert.title}: revised {', '.join(sorted(set(adopted)))} after critiques" if adopted
               else f"{expert.title}: keeps its proposal; no objection to act on")
    return ExpertProposal(summary=summary, choices=[by_field[f] for f in expert.remit if f in by_field],
                          confidence=prior.confidence)


def handlers() -> dict[str, Callable[[dict[str, Any]], Any]]:
    """The offline backend's handler table, one per request kind the agents send."""
    return {
        TASK_ANALYSIS: task_analysis,
        EXPERT_PROPOSAL: expert_proposal,
        EXPERT_CRITIQUE: expert_critique,
        CRITIC_SCORES: critic_scores,
    }
