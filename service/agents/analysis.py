"""Task Analysis: data profile + task text → `TaskAnalysis`, citing the method cards it relied on."""

from __future__ import annotations

import logging
from typing import Any

from service.agents.knowledge import Hit, KnowledgeBase, default_knowledge_base
from service.agents.plan import TaskAnalysis
from service.agents.profile_facts import ProfileFacts, facts_from_profile
from service.agents.prompts import task_analysis_request
from service.errors import CellForgeError
from service.llm import Backend, Check

log = logging.getLogger(__name__)

_KIND_WORDS = {
    "genetic": "genetic knockout crispr perturb-seq gene",
    "genetic_combo": "genetic combination double perturbation combo crispr",
    "chemical": "drug compound dose chemical",
    "cytokine": "cytokine stimulation immune cell type",
}
# Evaluation cards are retrieved on their own so that method cards never crowd them out.
_EVALUATION_QUERY = "evaluation baseline linear ridge mean pearson delta systematic variation benchmark"


class AnalysisError(CellForgeError, ValueError):
    """The task analysis could not be produced or is inconsistent with the data."""


def _profile_query(facts: ProfileFacts) -> str:
    words = [_KIND_WORDS[facts.perturbation_kind]]
    if facts.n_contexts > 1:
        words.append("cell type context")
    if facts.n_doses > 0:
        words.append("dose")
    if facts.n_combos > 0:
        words.append("combination")
    return " ".join(words)


def retrieve_cards(facts: ProfileFacts, task_text: str, kb: KnowledgeBase, k: int = 5) -> list[tuple[Hit, str]]:
    """Method cards for the task and profile, then evaluation cards; each hit tagged with its role."""
    evaluation = kb.search(_EVALUATION_QUERY, k=2, kind=facts.perturbation_kind)
    taken = {h.card.id for h in evaluation}
    methods = [h for h in kb.search(f"{task_text} {_profile_query(facts)}", k=k + len(taken),
                                    kind=facts.perturbation_kind) if h.card.id not in taken][:k]
    return [(h, "method") for h in methods] + [(h, "evaluation") for h in evaluation]


def _kind_check(facts: ProfileFacts) -> Check:
    """The perturbation kind is read off the data, not chosen: a reply that says otherwise is re-asked."""
    def check(reply: TaskAnalysis) -> None:
        if reply.perturbation_kind != facts.perturbation_kind:
            raise ValueError(f"perturbation_kind {reply.perturbation_kind!r} contradicts the data profile, "
                             f"which says {facts.perturbation_kind!r} (context.facts.perturbation_kind)")
    return check


def analyse_task(profile: Any, task_text: str, llm: Backend, kb: KnowledgeBase | None = None) -> TaskAnalysis:
    """Frame the task. `profile` is the data layer's profile (or a dict / `ProfileFacts`)."""
    if not task_text.strip():
        raise AnalysisError("task text is empty: say what should be predicted (e.g. 'unseen knockouts')")
    facts = facts_from_profile(profile)
    kb = kb or default_knowledge_base()
    hits = retrieve_cards(facts, task_text, kb)
    context = {
        "facts": facts.model_dump(),
        "task_text": task_text,
        "cards": [
            {"id": h.card.id, "role": role, "name": h.card.name, "score": round(h.score, 4),
             "applies_to": list(h.card.applies_to),
             "when_to_use": h.card.when_to_use, "summary": h.card.summary, "pitfalls": list(h.card.pitfalls)}
            for h, role in hits
        ],
    }
    reply = llm.ask(task_analysis_request(context, _kind_check(facts)))
    unknown = [c.card_id for c in reply.cited_cards if c.card_id not in kb.cards]
    if unknown:
        # A model may invent card ids; an uncitable citation is worse than none, so it is removed, loudly.
        log.warning("task analysis cited unknown method cards %s; removed", unknown)
        reply = reply.model_copy(update={"cited_cards": [c for c in reply.cited_cards if c.card_id in kb.cards]})
    return reply
