"""Offline handlers answer every request kind with schema-valid replies; prompts carry each JSON schema once."""

import json

import pytest

from service.agents import analyse_task, handlers, run_discussion
from service.agents.experts import ALL_EXPERTS, PROPOSERS
from service.agents.llm_kinds import ALL_KINDS
from service.agents.messages import Critique, CriticScores, ExpertProposal
from service.agents.plan import TaskAnalysis, plan_field_paths
from service.agents.prompts import (
    critique_request,
    proposal_request,
    scores_request,
    task_analysis_request,
)
from service.llm import MissingHandler, OfflineBackend, RecordingBackend, read_calls, system_prompt

from agent_profiles import TASKS

_SCHEMA_OF_KIND = {"task_analysis": TaskAnalysis, "expert_proposal": ExpertProposal,
                   "expert_critique": Critique, "critic_scores": CriticScores}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_offline_handlers_give_schema_valid_replies_for_every_kind(tmp_path, name):
    facts, task = TASKS[name]
    assert set(handlers()) == set(ALL_KINDS)
    llm = RecordingBackend(OfflineBackend(handlers()), tmp_path)
    run_discussion(analyse_task(facts, task, llm), facts, llm, tmp_path)
    calls = read_calls(tmp_path / "llm_calls.jsonl")
    assert {c.kind for c in calls} == set(ALL_KINDS)
    for call in calls:
        schema = _SCHEMA_OF_KIND[call.kind]
        assert call.request.schema_name == schema.__name__
        schema.model_validate(call.reply)  # what was recorded re-validates: replay will accept it
    proposals = [ExpertProposal.model_validate(c.reply) for c in calls if c.kind == "expert_proposal"]
    assert {c.field for p in proposals for c in p.choices} == set(plan_field_paths())


def test_every_prompt_carries_its_reply_schema_exactly_once():
    context = {"round": 1}
    requests = [task_analysis_request(context), scores_request(context)]
    requests += [proposal_request(e, context) for e in PROPOSERS]
    requests += [critique_request(ALL_EXPERTS["critic"], e, context) for e in PROPOSERS]
    for request in requests:
        assert request.kind in ALL_KINDS and request.schema is _SCHEMA_OF_KIND[request.kind]
        sent = system_prompt(request)  # what the OpenAI backend sends: the agent's text + the schema block
        schema = json.dumps(request.schema.model_json_schema(), separators=(",", ":"))
        assert sent.count(schema) == 1 and sent.count("validate against this JSON schema") == 1
        assert request.schema.__name__ + ")" in sent
    dl = proposal_request(ALL_EXPERTS["dl_architect"], context).system
    assert '"architecture.hidden_width"' in dl and '"minimum":8' in dl and "n_hvg/4" in dl  # remit + design space
    assert '"training.lr"' not in dl


def test_unknown_request_kind_is_a_clear_error():
    from service.llm import LLMRequest

    with pytest.raises(MissingHandler, match="'debug'"):
        OfflineBackend(handlers()).ask(LLMRequest("debug", "s", "u", {}, Critique))
