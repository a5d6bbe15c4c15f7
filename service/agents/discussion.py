"""Method Design: experts discuss in rounds along a graph until consensus, then a Plan is synthesised.

A round: every proposer proposes (or revises) the plan fields in its remit; each edge (author → target)
of the `DiscussionGraph` carries one critique; the critic scores every proposal; confidences update.

Confidence update (documented, tested): for expert i after round t,

    c_i(t) = (1 − λ)·c_i(t−1) + λ·(w_s·S_i + w_a·A_i),     λ = 0.5, w_s = w_a = 0.5

S_i is the critic's score of i's proposal, A_i the peer agreement it received:
A_i = Π_k (1 − s_k) over the distinct objections k (severity s_k) addressed to i this round, 1 when none.
Supports do not offset objections: praise of one field does not answer a concern about another.
c_i(0) is the expert's own confidence in its first proposal.
Consensus: min_i c_i ≥ `CONSENSUS_THRESHOLD` and max_i c_i − min_i c_i ≤ `CONSENSUS_SPREAD`.

Synthesis: for each plan field the candidates are the owner's final value, weighted by its confidence ×
critic score, and every objection of the last round that suggests another value, weighted by its severity ×
its author's confidence (1 for the critic). The heaviest value wins (the owner's on ties), so a strong
objection the owner had no round left to answer can still carry the plan when the owner is unsure.
`plan.provenance` records the argument that set each field (a critique's when a critique's value won or was
adopted). If overriding values break a cross-field rule, the owners' values stand alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from service.agents import design_space
from service.agents.experts import ALL_EXPERTS, PROPOSERS, Expert, owner_of
from service.agents.messages import Critique, CritiqueItem, CriticScores, ExpertProposal, FieldValue
from service.agents.plan import ArgumentRef, Plan, TaskAnalysis, plan_field_paths
from service.agents.profile_facts import facts_from_profile
from service.agents.prompts import critique_request, proposal_request, scores_request
from service.errors import CellForgeError
from service.llm import Backend, Check, LLMRequest, ask_all

LAMBDA = 0.5
W_SCORE = 0.5
W_AGREEMENT = 0.5
CONSENSUS_THRESHOLD = 0.75
CONSENSUS_SPREAD = 0.2
MISSING_SCORE = 0.5  # a proposal the critic did not score counts as neither good nor bad


class DiscussionError(CellForgeError, RuntimeError):
    """The discussion could not produce a valid plan."""


@dataclass(frozen=True)
class DiscussionGraph:
    """Who critiques whom: each (author, target) edge carries one critique per round."""

    edges: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        proposers = {e.id for e in PROPOSERS}
        for author, target in self.edges:
            if author not in ALL_EXPERTS or target not in proposers or author == target:
                raise DiscussionError(f"invalid discussion edge {author} -> {target}: the author must be an "
                                      f"expert and the target another proposer ({sorted(proposers)})")

    def without(self, author: str, target: str) -> DiscussionGraph:
        if (author, target) not in self.edges:
            raise DiscussionError(f"no edge {author} -> {target} in the graph")
        return DiscussionGraph(tuple(e for e in self.edges if e != (author, target)))


DEFAULT_GRAPH = DiscussionGraph(
    tuple(("critic", e.id) for e in PROPOSERS)
    + (
        ("statistician", "dl_architect"), ("dl_architect", "statistician"),
        ("biologist", "dl_architect"), ("dl_architect", "biologist"),
        ("statistician", "training"), ("dl_architect", "training"), ("training", "dl_architect"),
        ("biologist", "data_engineer"), ("data_engineer", "biologist"),
    )
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProposalMessage(_Model):
    message_id: str
    round: int
    expert: str
    proposal: ExpertProposal


class CritiqueMessage(_Model):
    message_id: str
    round: int
    author: str
    target: str
    critique: Critique


class RoundRecord(_Model):
    round: int
    proposals: list[ProposalMessage]
    critiques: list[CritiqueMessage]
    scores: CriticScores
    agreement: dict[str, float]
    confidence_before: dict[str, float]
    confidence_after: dict[str, float]
    changes: list[str]  # "field: old -> new (expert)" relative to the previous round
    consensus: bool


class DiscussionResult(_Model):
    plan: Plan
    rounds: list[RoundRecord]
    consensus: bool


@dataclass(frozen=True)
class DiscussionEvent:
    """Live progress: `kind` is proposal | critique | scores | round_end | done."""

    kind: Literal["proposal", "critique", "scores", "round_end", "done"]
    round: int
    expert: str | None = None
    confidences: dict[str, float] = field(default_factory=dict)
    message: str = ""


def peer_agreement(items: list[tuple[str, CritiqueItem]]) -> float:
    """A_i from the (author, item) pairs an expert received; one concern split over fields counts once."""
    objections = {(author, i.argument): i.severity for author, i in items if i.stance == "object"}
    agreement = 1.0
    for severity in objections.values():
        agreement *= 1.0 - severity
    return agreement


def update_confidence(previous: float, critic_score: float, agreement: float) -> float:
    target = W_SCORE * critic_score + W_AGREEMENT * agreement
    return max(0.0, min(1.0, (1 - LAMBDA) * previous + LAMBDA * target))


def is_consensus(confidences: dict[str, float]) -> bool:
    values = list(confidences.values())
    return min(values) >= CONSENSUS_THRESHOLD and max(values) - min(values) <= CONSENSUS_SPREAD


def run_discussion(
    analysis: TaskAnalysis,
    profile: Any,
    llm: Backend,
    out_dir: str | Path,
    max_rounds: int = 4,
    on_event: Callable[[DiscussionEvent], None] | None = None,
    graph: DiscussionGraph = DEFAULT_GRAPH,
) -> DiscussionResult:
    """Discuss until consensus or `max_rounds`; write `out_dir/discussion/round_N.{json,md}` and `plan.json`."""
    if not 1 <= max_rounds <= 20:
        raise DiscussionError(f"max_rounds must be in 1..20, got {max_rounds}")
    facts = facts_from_profile(profile)
    transcript_dir = Path(out_dir) / "discussion"
    transcript_dir.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda event: None)
    # Every question carries the profile and the framing; the framing's key numbers are only profile
    # numbers again, so they are left out of the ~40 questions of a discussion.
    base = {"facts": facts.model_dump(), "analysis": analysis.model_dump(exclude={"key_numbers"})}
    checks = {e.id: proposal_check(e, facts, analysis) for e in PROPOSERS}

    confidences: dict[str, float] = {}
    latest: dict[str, ProposalMessage] = {}
    origin: dict[str, dict[str, ArgumentRef]] = {e.id: {} for e in PROPOSERS}  # where each kept value came from
    inbox: dict[str, list[CritiqueMessage]] = {e.id: [] for e in PROPOSERS}
    rounds: list[RoundRecord] = []
    consensus = False

    for rnd in range(1, max_rounds + 1):
        proposals = _propose(llm, base, rnd, latest, inbox, origin, confidences, emit, checks)
        draft = {f: v for m in proposals.values() for f, v in m.proposal.values().items()}
        critiques = _critique(llm, base, rnd, graph, proposals, draft, confidences, emit)
        scores = llm.ask(scores_request({**base, "round": rnd, "draft": draft,
                                         "proposals": {k: m.proposal.model_dump() for k, m in proposals.items()}},
                                        scores_check(proposals)))
        emit(DiscussionEvent("scores", rnd, "critic", dict(confidences),
                             ", ".join(f"{s.expert}={s.score:.2f}" for s in scores.scores)))

        score_of = {s.expert: s.score for s in scores.scores}
        before = dict(confidences)
        agreement = {}
        for expert in PROPOSERS:
            received = [(m.author, i) for m in critiques if m.target == expert.id for i in m.critique.items]
            agreement[expert.id] = peer_agreement(received)
            confidences[expert.id] = update_confidence(
                before[expert.id], score_of.get(expert.id, MISSING_SCORE), agreement[expert.id])
        consensus = is_consensus(confidences)
        record = RoundRecord(
            round=rnd, proposals=list(proposals.values()), critiques=critiques, scores=scores,
            agreement=agreement, confidence_before=before, confidence_after=dict(confidences),
            changes=_changes(latest, proposals), consensus=consensus,
        )
        rounds.append(record)
        _save_round(transcript_dir, record)
        emit(DiscussionEvent("round_end", rnd, None, dict(confidences),
                             "consensus" if consensus else "no consensus yet"))
        latest = proposals
        inbox = {e.id: [m for m in critiques if m.target == e.id] for e in PROPOSERS}
        if consensus:
            break

    plan = synthesise_plan(analysis, facts, latest, origin, confidences, rounds)
    (transcript_dir / "plan.json").write_text(plan.model_dump_json(indent=1))
    emit(DiscussionEvent("done", rounds[-1].round, None, dict(confidences),
                         f"plan synthesised; consensus={consensus}"))
    return DiscussionResult(plan=plan, rounds=rounds, consensus=consensus)


def _propose(llm: Backend, base: dict[str, Any], rnd: int, latest: dict[str, ProposalMessage],
             inbox: dict[str, list[CritiqueMessage]], origin: dict[str, dict[str, ArgumentRef]],
             confidences: dict[str, float], emit: Callable[[DiscussionEvent], None],
             checks: dict[str, Check]) -> dict[str, ProposalMessage]:
    """Each proposer proposes (round 1) or revises its last proposal in the light of the critiques it
    received; proposers do not read each other's replies, so they are asked at once."""
    requests: list[LLMRequest[ExpertProposal]] = []
    for expert in PROPOSERS:
        previous = latest.get(expert.id)
        context = {
            **base, "expert": expert.id, "round": rnd,
            "previous": previous.proposal.model_dump() if previous else None,
            "critiques": [
                {"author": m.author, "round": m.round, "message_id": m.message_id,
                 "items": [i.model_dump() for i in m.critique.items]}
                for m in inbox[expert.id]
            ],
        }
        requests.append(proposal_request(expert, context, checks[expert.id]))
    proposals: dict[str, ProposalMessage] = {}
    for expert, reply in zip(PROPOSERS, ask_all(llm, requests), strict=True):
        message = ProposalMessage(message_id=f"r{rnd}.{expert.id}.proposal", round=rnd, expert=expert.id,
                                  proposal=reply)
        _track_origin(origin[expert.id], latest.get(expert.id), message, {m.message_id for m in inbox[expert.id]})
        proposals[expert.id] = message
        confidences.setdefault(expert.id, reply.confidence)
        emit(DiscussionEvent("proposal", rnd, expert.id, dict(confidences), reply.summary))
    return proposals


def _critique(llm: Backend, base: dict[str, Any], rnd: int, graph: DiscussionGraph,
              proposals: dict[str, ProposalMessage], draft: dict[str, FieldValue], confidences: dict[str, float],
              emit: Callable[[DiscussionEvent], None]) -> list[CritiqueMessage]:
    """One critique per edge of the graph, each reading the target's proposal against the whole draft;
    critiques do not read each other, so they are asked at once."""
    requests = [
        critique_request(ALL_EXPERTS[author], ALL_EXPERTS[target], {
            **base, "author": author, "target": target, "round": rnd,
            "proposal": proposals[target].proposal.model_dump(), "draft": draft})
        for author, target in graph.edges
    ]
    critiques: list[CritiqueMessage] = []
    for (author, target), reply in zip(graph.edges, ask_all(llm, requests), strict=True):
        critiques.append(CritiqueMessage(message_id=f"r{rnd}.{author}->{target}.critique", round=rnd,
                                         author=author, target=target, critique=reply))
        emit(DiscussionEvent("critique", rnd, author, dict(confidences),
                             f"{author} -> {target}: {_stance_counts(reply)}"))
    return critiques


def proposal_check(expert: Expert, facts: Any, analysis: TaskAnalysis) -> Check:
    """The rules a proposal keeps beyond its schema, each failure worded for the model: only fields of
    the expert's remit, each set once, and values that form a valid plan with the vetted defaults of the
    other fields (the cross-field rules: encoder options, loss weights, the primary metric listed)."""
    def check(proposal: ExpertProposal) -> None:
        fields = [c.field for c in proposal.choices]
        outside = [f for f in fields if f not in expert.remit]
        if outside:
            raise ValueError(f"fields outside the {expert.id} remit: {outside}; set only {list(expert.remit)}")
        twice = sorted({f for f in fields if fields.count(f) > 1})
        if twice:
            raise ValueError(f"fields set more than once: {twice}; give one FieldChoice per field")
        values = {path: design_space.choose(path, facts, analysis).value for path in plan_field_paths()}
        values.update(proposal.values())
        sections: dict[str, dict[str, FieldValue]] = {}
        for path, value in values.items():
            section, _, name = path.partition(".")
            sections.setdefault(section, {})[name] = value
        try:
            Plan.model_validate({"perturbation_kind": analysis.perturbation_kind, **sections})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'plan'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"the values break a cross-field rule of the plan for "
                             f"{analysis.perturbation_kind} perturbations: {problems}") from None
    return check


def scores_check(proposals: dict[str, ProposalMessage]) -> Check:
    """The critic scores proposals of this round only, each once."""
    def check(scores: CriticScores) -> None:
        named = [s.expert for s in scores.scores]
        unknown = [e for e in named if e not in proposals]
        if unknown:
            raise ValueError(f"scores for {unknown}, who made no proposal; score {sorted(proposals)}")
        twice = sorted({e for e in named if named.count(e) > 1})
        if twice:
            raise ValueError(f"{twice} scored more than once; one score per expert")
    return check


def _track_origin(origin: dict[str, ArgumentRef], previous: ProposalMessage | None, message: ProposalMessage,
                  received: set[str]) -> None:
    """Keep the first argument that set a value while later rounds merely repeat it. A `source` naming a
    critique the expert never received (a model may invent one) is ignored: the expert's own argument stands."""
    before = previous.proposal.values() if previous else {}
    for choice in message.proposal.choices:
        if choice.field in origin and before.get(choice.field) == choice.value:
            continue
        source = choice.source if choice.source and choice.source.message_id in received else None
        origin[choice.field] = source or ArgumentRef(
            round=message.round, expert=message.expert, message_id=message.message_id,
            summary=choice.argument[:2000])


def _stance_counts(critique: Critique) -> str:
    objections = sum(1 for i in critique.items if i.stance == "object")
    return f"{objections} objection(s), {len(critique.items) - objections} support(s)"


def _changes(previous: dict[str, ProposalMessage], current: dict[str, ProposalMessage]) -> list[str]:
    out = []
    for expert, message in current.items():
        if expert not in previous:
            continue
        old = previous[expert].proposal.values()
        for choice in message.proposal.choices:
            if choice.field in old and old[choice.field] != choice.value:
                out.append(f"{choice.field}: {old[choice.field]!r} -> {choice.value!r} ({expert})")
    return out


@dataclass(frozen=True)
class _Candidate:
    value: FieldValue
    weight: float
    ref: ArgumentRef


def _candidates(path: str, final: dict[str, ProposalMessage], origin: dict[str, dict[str, ArgumentRef]],
                confidences: dict[str, float], last: RoundRecord) -> list[_Candidate]:
    """The owner's value first (it wins ties), then the last round's objections suggesting another value."""
    score_of = {s.expert: s.score for s in last.scores.scores}
    owner = owner_of(path).id
    out = [
        _Candidate(c.value, confidences[owner] * score_of.get(owner, MISSING_SCORE), origin[owner][path])
        for c in (final[owner].proposal.choices if owner in final else []) if c.field == path
    ]
    for m in last.critiques:
        for item in m.critique.items:
            if item.stance == "object" and item.field == path and item.suggested_value is not None:
                ref = ArgumentRef(round=m.round, expert=m.author, message_id=m.message_id,
                                  summary=item.argument[:2000])
                out.append(_Candidate(item.suggested_value, item.severity * confidences.get(m.author, 1.0), ref))
    return out


def synthesise_plan(
    analysis: TaskAnalysis,
    facts: Any,
    final: dict[str, ProposalMessage],
    origin: dict[str, dict[str, ArgumentRef]],
    confidences: dict[str, float],
    rounds: list[RoundRecord],
) -> Plan:
    chosen: dict[str, _Candidate] = {}
    owners_only: dict[str, _Candidate] = {}
    for path in plan_field_paths():
        candidates = _candidates(path, final, origin, confidences, rounds[-1])
        if not candidates or candidates[0].ref.expert != owner_of(path).id:
            # The owner left the field open (an LLM expert may omit one): the vetted default fills it, said so.
            choice = design_space.choose(path, facts, analysis)
            candidates.insert(0, _Candidate(choice.value, 0.0, ArgumentRef(
                round=0, expert="design_space", message_id="design_space",
                summary=f"no expert proposed it; vetted default: {choice.argument}"[:2000])))
        weights: dict[str, float] = {}
        for candidate in candidates:
            key = json.dumps(candidate.value)
            weights[key] = weights.get(key, 0.0) + candidate.weight
        best = max(weights, key=lambda k: weights[k])  # the first maximum: the owner's value on ties
        chosen[path] = max((c for c in candidates if json.dumps(c.value) == best), key=lambda c: c.weight)
        owners_only[path] = candidates[0]
    try:
        return _build_plan(analysis, chosen, rounds, confidences)
    except ValidationError:
        pass
    try:
        return _build_plan(analysis, owners_only, rounds, confidences)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise DiscussionError(f"the discussion's final proposals do not form a valid plan: {problems}") from None


def _build_plan(analysis: TaskAnalysis, chosen: dict[str, _Candidate], rounds: list[RoundRecord],
                confidences: dict[str, float]) -> Plan:
    sections: dict[str, dict[str, FieldValue]] = {}
    for path, candidate in chosen.items():
        section, _, name = path.partition(".")
        sections.setdefault(section, {})[name] = candidate.value
    provenance = {path: c.ref for path, c in chosen.items()}
    return Plan.model_validate({
        "perturbation_kind": analysis.perturbation_kind, **sections, "provenance": provenance,
        "rationale": _rationale(rounds, provenance, confidences),
    })


def _rationale(rounds: list[RoundRecord], provenance: dict[str, ArgumentRef], confidences: dict[str, float]) -> str:
    last = rounds[-1]
    state = (f"consensus in round {last.round}" if last.consensus
             else f"no consensus after {last.round} round(s); plan weighted by confidence × critic score")
    lines = [f"Discussion: {state}; confidences "
             + ", ".join(f"{k}={v:.2f}" for k, v in confidences.items()) + "."]
    changed = [c for r in rounds for c in r.changes]
    if changed:
        lines.append("Changed by critiques: " + "; ".join(changed) + ".")
    for path in ("architecture.perturbation_encoder", "architecture.base_predictor", "architecture.hidden_width",
                 "loss.de_weighting", "evaluation.primary_metric"):
        ref = provenance[path]
        lines.append(f"{path} ({ref.expert}, round {ref.round}): {ref.summary}")
    return "\n".join(lines)


def _save_round(directory: Path, record: RoundRecord) -> None:
    (directory / f"round_{record.round}.json").write_text(record.model_dump_json(indent=1))
    (directory / f"round_{record.round}.md").write_text(render_round_markdown(record))


def render_round_markdown(record: RoundRecord) -> str:
    lines = [f"# Round {record.round}", ""]
    lines += ["## Proposals", ""]
    for m in record.proposals:
        lines.append(f"### {ALL_EXPERTS[m.expert].title} (`{m.message_id}`, confidence "
                     f"{m.proposal.confidence:.2f})")
        lines.append(f"{m.proposal.summary}")
        lines += [f"- `{c.field}` = `{c.value!r}` — {c.argument}" for c in m.proposal.choices]
        lines.append("")
    lines += ["## Critiques", ""]
    for c in record.critiques:
        lines.append(f"### {c.author} → {c.target} (`{c.message_id}`)")
        if not c.critique.items:
            lines.append("- nothing to add")
        for i in c.critique.items:
            suggestion = f" → suggests `{i.suggested_value!r}`" if i.suggested_value is not None else ""
            lines.append(f"- **{i.stance}** `{i.field}` (severity {i.severity:.1f}){suggestion}: {i.argument}")
        lines.append("")
    lines += ["## Critic scores", ""]
    lines += [f"- {s.expert}: {s.score:.2f} — {'; '.join(s.reasons)}" for s in record.scores.scores]
    lines += ["", "## Confidence", "", "| expert | before | critic score | agreement | after |",
              "|---|---|---|---|---|"]
    score_of = {s.expert: s.score for s in record.scores.scores}
    for expert, after in record.confidence_after.items():
        lines.append(f"| {expert} | {record.confidence_before[expert]:.2f} | {score_of.get(expert, MISSING_SCORE):.2f} "
                     f"| {record.agreement[expert]:.2f} | {after:.2f} |")
    if record.changes:
        lines += ["", "## Changes from the previous round", ""] + [f"- {c}" for c in record.changes]
    lines += ["", f"**Consensus:** {'yes' if record.consensus else 'no'}", ""]
    return "\n".join(lines)
