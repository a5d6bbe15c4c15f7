"""LLM mode: the same agents through the OpenAI backend against a scripted OpenAI-compatible server.

The scripted model answers each chat request by reading what a real model would read — the schema named
in the system prompt and the JSON context in the user prompt — and replying with JSON text. So these
tests cover prompts, context serialisation, schema validation (with a re-ask) and replay, end to end.
"""

import json

from fake_llm_server import Reply
from scripted_experts import RuleModel

from service.agents import analyse_task, handlers, run_discussion
from service.agents.llm_kinds import ALL_KINDS
from service.agents.messages import Critique, CriticScores, ExpertProposal
from service.agents.plan import TaskAnalysis
from service.llm import OfflineBackend, OpenAIBackend, RecordingBackend, ReplayBackend, read_calls

from agent_profiles import TASKS

_SCHEMAS = {"TaskAnalysis": TaskAnalysis, "ExpertProposal": ExpertProposal, "Critique": Critique,
            "CriticScores": CriticScores}


def spoil_first_dropout(schema_name, context, reply, asked):
    """The first dl_architect proposal comes back with an out-of-range dropout, to provoke a re-ask."""
    if schema_name == "ExpertProposal" and context["expert"] == "dl_architect" and context["round"] == 1 \
            and asked == 1:
        for choice in reply["choices"]:
            if choice["field"] == "architecture.dropout":
                choice["value"] = 0.95
        return json.dumps(reply)
    return None


def test_llm_mode_produces_the_offline_plan_and_replays_it(fake_llm, tmp_path):
    facts, task = TASKS["drug"]
    model = RuleModel(spoil_first_dropout)
    fake_llm.script(*[Reply(model) for _ in range(120)])
    llm = RecordingBackend(OpenAIBackend(fake_llm.base_url, "fake-model", "sk-test", backoff_initial=0.01),
                           tmp_path / "run")
    analysis = analyse_task(facts, task, llm)
    result = run_discussion(analysis, facts, llm, tmp_path / "run", max_rounds=3)

    offline = OfflineBackend(handlers())
    expected = run_discussion(analyse_task(facts, task, offline), facts, offline, tmp_path / "offline", max_rounds=3)
    assert result.plan == expected.plan and result.consensus == expected.consensus

    # Every system prompt carried the JSON schema of its reply once; proposals also their remit's field schemas.
    for schema_name, system in model.seen:
        assert system.count(json.dumps(_SCHEMAS[schema_name].model_json_schema(), separators=(",", ":"))) == 1
    proposal_prompts = [s for name, s in model.seen if name == "ExpertProposal"]
    assert any('"architecture.dropout"' in s and '"maximum":0.8' in s for s in proposal_prompts)

    calls = read_calls(tmp_path / "run" / "llm_calls.jsonl")
    assert {c.kind for c in calls} == set(ALL_KINDS)
    assert sum(c.reasks for c in calls) == 1  # the spoiled dropout was rejected by the schema and re-asked
    replayed = ReplayBackend(tmp_path / "run")
    again = run_discussion(analyse_task(facts, task, replayed), facts, replayed, tmp_path / "replay", max_rounds=3)
    assert again.plan == result.plan and replayed.remaining == 0
