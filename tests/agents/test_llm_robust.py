"""The discussion survives a model that misbehaves like real ones, against the scripted server: an
expert outside its remit or breaking a cross-field rule is re-asked with the reason; a question that
never gets a valid reply is answered by the rules, recorded as such, and the run replays; independent
questions are asked at once, within the bound."""

import json

import pytest
from fake_llm_server import Reply
from scripted_experts import RuleModel

from service.agents import DEFAULT_GRAPH, analyse_task, handlers, run_discussion
from service.llm import LLMConfig, LLMInvalidReply, OfflineBackend, make_backend, read_calls

from agent_profiles import TASKS


def llm_stack(fake_llm, run_dir, model, delay=0.0, **settings):
    fake_llm.script(*[Reply(model, delay=delay) for _ in range(200)])
    config = LLMConfig.resolve({"model": "fake-model", "base_url": fake_llm.base_url, "api_key": "sk-test",
                                **settings}, env={}, config_path=None)
    return make_backend(config, handlers(), run_dir)


def discuss(llm, out, name="knockout", **kw):
    facts, task = TASKS[name]
    return run_discussion(analyse_task(facts, task, llm), facts, llm, out, **kw)


def offline_plan(tmp_path, name="knockout", **kw):
    return discuss(OfflineBackend(handlers()), tmp_path / "offline", name, **kw).plan


def reasks_sent(fake_llm):
    return [r.messages[-1]["content"] for r in fake_llm.requests if len(r.messages) > 2]


def first_proposal_of(expert, change):
    def spoil(schema_name, context, reply, asked):
        if schema_name == "ExpertProposal" and context["expert"] == expert and context["round"] == 1 and asked == 1:
            return json.dumps(change(reply))
        return None
    return spoil


def test_expert_outside_its_remit_is_reasked_with_the_reason(fake_llm, tmp_path):
    def overreach(reply):
        reply["choices"].append({"field": "training.lr", "value": 0.5, "argument": "faster"})
        return reply

    strict = llm_stack(fake_llm, tmp_path / "strict", RuleModel(first_proposal_of("biologist", overreach)),
                       max_reasks=0, fallback=False)
    with pytest.raises(LLMInvalidReply, match=r"fields outside the biologist remit"):  # the failure, as it was
        discuss(strict, tmp_path / "strict")

    llm = llm_stack(fake_llm, tmp_path / "run", RuleModel(first_proposal_of("biologist", overreach)))
    result = discuss(llm, tmp_path / "run")

    assert result.plan == offline_plan(tmp_path)
    (reask,) = reasks_sent(fake_llm)
    assert "not a valid ExpertProposal" in reask
    assert "fields outside the biologist remit: ['training.lr']" in reask
    (record,) = [c for c in read_calls(tmp_path / "run") if c.key == "r1.biologist"]
    assert record.reasks == 1 and record.fallback is None
    assert [e.outcome for e in record.exchanges] == ["rejected", "accepted"]
    assert "training.lr" in record.exchanges[0].problem


def test_cross_field_rule_is_reasked_with_the_rule(fake_llm, tmp_path):
    def clash(reply):
        for choice in reply["choices"]:
            if choice["field"] == "loss.kind":
                choice["value"] = "mse"
            if choice["field"] == "loss.pearson_weight":
                choice["value"] = 0.5
        return reply

    llm = llm_stack(fake_llm, tmp_path / "run", RuleModel(first_proposal_of("training", clash)))
    result = discuss(llm, tmp_path / "run")

    assert result.plan == offline_plan(tmp_path)
    (reask,) = reasks_sent(fake_llm)
    assert "break a cross-field rule of the plan" in reask and "pearson_weight must be 0 when kind='mse'" in reask


def test_analysis_contradicting_the_data_is_reasked(fake_llm, tmp_path):
    def chemical(schema_name, context, reply, asked):
        return json.dumps({**reply, "perturbation_kind": "chemical"}) if schema_name == "TaskAnalysis" \
            and asked == 1 else None

    facts, task = TASKS["knockout"]
    llm = llm_stack(fake_llm, tmp_path / "run", RuleModel(chemical))
    assert analyse_task(facts, task, llm).perturbation_kind == "genetic"
    (reask,) = reasks_sent(fake_llm)
    assert "perturbation_kind 'chemical' contradicts the data profile, which says 'genetic'" in reask


@pytest.mark.slow
def test_a_question_never_answered_validly_falls_back_to_the_rules_and_the_run_replays(fake_llm, tmp_path):
    def prose(schema_name, context, reply, asked):
        if schema_name == "ExpertProposal" and context["expert"] == "dl_architect" and context["round"] == 1:
            return "<think>{width?}</think> I would pick a wide residual MLP, as usual."
        return None

    strict = llm_stack(fake_llm, tmp_path / "strict", RuleModel(prose), max_reasks=0, fallback=False)
    with pytest.raises(LLMInvalidReply, match="ExpertProposal for 'expert_proposal'"):  # the failure, as it was
        discuss(strict, tmp_path / "strict")

    llm = llm_stack(fake_llm, tmp_path / "run", RuleModel(prose), max_reasks=2)
    result = discuss(llm, tmp_path / "run")

    assert result.plan == offline_plan(tmp_path)  # the rules answered that one question; the run went on
    calls = read_calls(tmp_path / "run")
    (fallback,) = [c for c in calls if c.fallback is not None]
    assert fallback.key == "r1.dl_architect" and fallback.fallback.error_type == "LLMInvalidReply"
    assert [e.outcome for e in fallback.exchanges] == ["rejected"] * 3
    assert all(c.backend == "openai" and c.error is None for c in calls)

    fake_llm.stop()
    replayed = make_backend(LLMConfig(), {}, tmp_path / "replay", replay_from=tmp_path / "run")
    again = discuss(replayed, tmp_path / "replay")
    assert again.plan == result.plan and replayed.inner.remaining == 0
    assert [c.key for c in read_calls(tmp_path / "replay") if c.fallback] == ["r1.dl_architect"]


def test_critiques_are_asked_at_once_within_the_bound(fake_llm, tmp_path):
    model = RuleModel()
    llm = llm_stack(fake_llm, tmp_path / "run", model, delay=0.2, max_parallel=4)
    result = discuss(llm, tmp_path / "run", max_rounds=1)

    assert result.plan == offline_plan(tmp_path, max_rounds=1)
    critiques = [r for r in fake_llm.requests if "JSON schema (Critique)" in r.messages[0]["content"]]
    assert len(critiques) == 14
    in_flight = max(sum(1 for o in critiques if o.received_at <= r.received_at < o.answered_at) for r in critiques)
    assert in_flight == 4  # they overlap, and never more than max_parallel
    # The transcripts keep the graph's order whatever order the replies came back in.
    assert [(m.author, m.target) for m in result.rounds[0].critiques] == list(DEFAULT_GRAPH.edges)
