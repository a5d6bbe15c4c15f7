"""System and user prompts of every agent request.

The structured input travels in `LLMRequest.context` (the backend shows it to the model as JSON) and the
backend appends the reply's JSON schema once, so the prompts only say who speaks, what to decide, the
rules of the discussion, and the schemas of the plan fields in question (which the reply schema leaves
open). `check`s carry the rules beyond the schema; the backend re-asks with their reason.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from service.agents import design_space
from service.agents.experts import Expert
from service.agents.llm_kinds import CRITIC_SCORES, EXPERT_CRITIQUE, EXPERT_PROPOSAL, TASK_ANALYSIS
from service.agents.messages import Critique, CriticScores, ExpertProposal
from service.agents.offline_experts import ACCEPT_SEVERITY
from service.agents.plan import Plan, TaskAnalysis
from service.llm import Check, LLMRequest

_PREAMBLE = (
    "You are part of CellForge, which designs models that predict single-cell perturbation responses "
    "(the mean log-normalized profile of each held-out condition) and scores them against baselines "
    "(mean Δ, linear ridge on PCA gene embeddings) on Pearson Δ vs the perturbed centroid (Systema) and "
    "top-20-DE MSE. Ground every argument in the numbers of the data profile given in the context."
)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """`schema` with every `$ref` replaced by the definition it names (a field's schema stands alone)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


@functools.cache
def _plan_schema() -> dict[str, Any]:
    """The Plan's JSON schema, generated once (tens of milliseconds each time; a discussion asks ~40 times).
    Read only: `field_schemas` copies what it hands out."""
    return Plan.model_json_schema()


def field_schemas(fields: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The JSON schema of each named plan field (type, range, allowed values)."""
    plan_schema = _plan_schema()
    defs = plan_schema["$defs"]
    out = {}
    for path in fields:
        section, _, name = path.partition(".")
        section_ref = plan_schema["properties"][section]["$ref"].rsplit("/", 1)[-1]
        out[path] = _inline(defs[section_ref]["properties"][name], defs)
    return out


CUSTOM_FIELD = "architecture.custom_components"
_FREE_ARCHITECTURE = (
    f"\n{CUSTOM_FIELD} may describe components outside the design space (e.g. an attention encoder over "
    "perturbation embeddings, a gene-graph prior) when the profile gives a reason the vetted components fall "
    "short: each with a snake_case name, its role, what it computes and how it plugs into the model. The code "
    "generator implements them within the generated-code contract, and the sandbox, the service's contract "
    "tests and validation decide whether they stay. Leave it empty ([]) when the vetted components suffice."
)


def task_analysis_request(context: dict[str, Any], check: Check | None = None) -> LLMRequest[TaskAnalysis]:
    system = (
        f"{_PREAMBLE}\nYou frame the task: perturbation kind, split scheme, metrics, baselines to beat, risks "
        "and preprocessing. Cite method cards only by the ids listed in context.cards, each with why it applies."
    )
    user = "Frame this perturbation-modelling task from the data profile (context.facts), the task text " \
           "(context.task_text) and the retrieved method cards (context.cards)."
    return LLMRequest(kind=TASK_ANALYSIS, system=system, user=user, context=context, schema=TaskAnalysis,
                      check=check)


def proposal_request(expert: Expert, context: dict[str, Any], check: Check | None = None
                     ) -> LLMRequest[ExpertProposal]:
    system = (
        f"{_PREAMBLE}\nYou are the {expert.title} expert ({expert.focus}). Propose a value for each plan field "
        f"in your remit, one FieldChoice each, with an argument quoting the profile. Choose among the vetted "
        f"options of the design space unless the data clearly calls for another valid value. Set no field "
        f"outside your remit.\n"
        f"Your remit and each field's JSON schema:\n{_compact(field_schemas(expert.remit))}\n"
        f"Design space (vetted components, when to use them):\n"
        f"{_compact([c for c in design_space.document() if c['field'] in expert.remit])}"
        + (_FREE_ARCHITECTURE if CUSTOM_FIELD in expert.remit else "")
    )
    user = ("Round {round}. If context.previous is set, revise it: adopt each objection in context.critiques "
            f"with severity >= {ACCEPT_SEVERITY} that you cannot refute, and keep the rest; when you adopt a "
            "critique's value, set `source` to that critique (round, expert, message_id, summary).").format(
        round=context.get("round", 1))
    return LLMRequest(kind=EXPERT_PROPOSAL, system=system, user=user, context=context, schema=ExpertProposal,
                      key=f"r{context.get('round', 1)}.{expert.id}", check=check)


def critique_request(author: Expert, target: Expert, context: dict[str, Any]) -> LLMRequest[Critique]:
    system = (
        f"{_PREAMBLE}\nYou are the {author.title} expert ({author.focus}). Critique the {target.title} expert's "
        "proposal (context.proposal) from your domain, against the whole draft plan (context.draft). One item per "
        "point: stance 'support' or 'object', severity in [0, 1] (objections >= "
        f"{ACCEPT_SEVERITY} are acted on), an argument quoting the profile, and for an objection a suggested "
        f"value valid for the field:\n{_compact(field_schemas(target.remit))}"
    )
    user = f"Critique the {target.title} proposal. Return no items if you have nothing from your domain to add."
    return LLMRequest(kind=EXPERT_CRITIQUE, system=system, user=user, context=context, schema=Critique,
                      key=f"r{context.get('round', 1)}.{author.id}->{target.id}")


def scores_request(context: dict[str, Any], check: Check | None = None) -> LLMRequest[CriticScores]:
    system = (
        f"{_PREAMBLE}\nYou are the critic. Score every proposal in context.proposals in [0, 1]: 1 when it has no "
        "weak point given the profile, lower by the weight of each weak point; list the reasons."
    )
    user = "Score each expert's proposal of this round."
    return LLMRequest(kind=CRITIC_SCORES, system=system, user=user, context=context, schema=CriticScores,
                      key=f"r{context.get('round', 1)}", check=check)
