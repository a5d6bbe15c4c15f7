"""Recording every call to llm_calls.jsonl, usage accounting, and replaying a run without any server."""

from __future__ import annotations

import json
import logging

import pytest
from fake_llm_server import Fail, Reply
from pydantic import BaseModel

from service.llm import (
    LLMConfig,
    LLMRequest,
    LLMUnavailable,
    OfflineBackend,
    OpenAIBackend,
    RecordingBackend,
    ReplayBackend,
    ReplayedError,
    ReplayExhausted,
    ReplayFileError,
    ReplayMismatch,
    make_backend,
)

KEY = "sk-proj-Zx81testkeyQ2w9e8r7t6y5"


class Proposal(BaseModel):
    method: str
    score: float


class Verdict(BaseModel):
    accept: bool
    reason: str


def ask_two(backend) -> list[BaseModel]:
    return [
        backend.ask(LLMRequest("propose", "You are an expert.", "Propose a method.",
                               {"n_cells": 500, "note": f"user pasted {KEY} here"}, Proposal)),
        backend.ask(LLMRequest("critique", "You are a critic.", "Judge it.", {"method": "mlp"}, Verdict)),
    ]


def openai_backend(fake_llm) -> OpenAIBackend:
    return OpenAIBackend(fake_llm.base_url, "fake-model", KEY, timeout=5, max_attempts=3,
                         backoff_initial=0.01, backoff_max=0.02)


@pytest.fixture
def recorded_run(fake_llm, tmp_path):
    """A run directory holding two calls recorded from the scripted server (the first one retried)."""
    fake_llm.script(
        Fail(500, "warming up"),
        Reply('{"method": "mlp", "score": 0.7}', prompt_tokens=200, completion_tokens=40),
        Reply('{"accept": true, "reason": "sound"}', prompt_tokens=100, completion_tokens=20),
    )
    run_dir = tmp_path / "run1"
    replies = ask_two(RecordingBackend(openai_backend(fake_llm), run_dir, secrets=[KEY]))
    return run_dir, replies


def test_recording_writes_one_line_per_call(recorded_run):
    run_dir, replies = recorded_run
    lines = [json.loads(line) for line in (run_dir / "llm_calls.jsonl").read_text().splitlines()]

    assert [rec["index"] for rec in lines] == [0, 1]
    assert [rec["kind"] for rec in lines] == ["propose", "critique"]
    first, second = lines
    assert first["backend"] == "openai" and first["model"] == "fake-model"
    assert first["request"]["system"] == "You are an expert."
    assert first["request"]["user"] == "Propose a method."
    assert first["request"]["context"] == {"n_cells": 500, "note": "user pasted [REDACTED] here"}
    assert first["request"]["schema_name"] == "Proposal"
    assert first["reply"] == {"method": "mlp", "score": 0.7} == replies[0].model_dump()
    assert (first["prompt_tokens"], first["completion_tokens"], first["attempts"]) == (200, 40, 2)
    assert (second["prompt_tokens"], second["completion_tokens"], second["attempts"]) == (100, 20, 1)
    assert first["latency_ms"] > 0 and first["error"] is None


def test_usage_summary_totals_the_run(fake_llm, tmp_path):
    fake_llm.script(
        Reply('{"method": "mlp", "score": 0.7}', prompt_tokens=200, completion_tokens=40),
        Reply('{"accept": true, "reason": "sound"}', prompt_tokens=100, completion_tokens=20),
    )
    recorder = RecordingBackend(openai_backend(fake_llm), tmp_path, secrets=[KEY])
    ask_two(recorder)
    usage = recorder.usage_summary()
    assert (usage.calls, usage.failed_calls, usage.attempts) == (2, 0, 2)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (300, 60, 360)
    assert usage.by_kind == {"propose": 1, "critique": 1}
    assert usage.models == ["fake-model"]
    assert 0 < usage.latency_ms_max <= usage.latency_ms_total
    assert usage.latency_ms_mean == pytest.approx(usage.latency_ms_total / 2, abs=0.01)


def test_failed_call_is_recorded_and_reraised(fake_llm, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake_llm.script(Fail(401, f"Incorrect API key provided: {KEY}"))
    recorder = RecordingBackend(openai_backend(fake_llm), tmp_path, secrets=[KEY])
    with pytest.raises(LLMUnavailable, match="HTTP 401"):
        recorder.ask(LLMRequest("propose", "s", "u", {}, Proposal))
    (record,) = [json.loads(line) for line in (tmp_path / "llm_calls.jsonl").read_text().splitlines()]
    assert record["reply"] is None
    assert record["error_type"] == "LLMUnavailable" and "HTTP 401" in record["error"]
    assert KEY not in (tmp_path / "llm_calls.jsonl").read_text()
    assert KEY not in caplog.text


def test_key_is_never_written(recorded_run):
    run_dir, _ = recorded_run
    text = (run_dir / "llm_calls.jsonl").read_text()
    assert KEY not in text
    assert "[REDACTED]" in text


def test_replay_reproduces_replies_in_order_without_a_server(recorded_run, fake_llm):
    run_dir, original = recorded_run
    fake_llm.stop()  # nothing can answer over the network any more
    served_before = len(fake_llm.requests)

    replay = ReplayBackend(run_dir)
    assert ask_two(replay) == original
    assert replay.remaining == 0
    assert len(fake_llm.requests) == served_before


def test_replayed_run_records_into_a_new_run_dir(recorded_run, tmp_path):
    run_dir, original = recorded_run
    config = LLMConfig.resolve(env={}, config_path=None)
    rerun = make_backend(config, handlers={}, run_dir=tmp_path / "run2", replay_from=run_dir)
    assert ask_two(rerun) == original
    copied = [json.loads(line) for line in (tmp_path / "run2" / "llm_calls.jsonl").read_text().splitlines()]
    assert [(r["backend"], r["reply"]) for r in copied] == [("replay", o.model_dump()) for o in original]


def test_replay_kind_mismatch_names_both_kinds(recorded_run):
    run_dir, _ = recorded_run
    replay = ReplayBackend(run_dir)
    with pytest.raises(ReplayMismatch, match=r"call #0 was recorded as kind 'propose' but the replayed run "
                                             r"asked kind 'debug'"):
        replay.ask(LLMRequest("debug", "s", "u", {}, Proposal))


def test_replay_schema_mismatch_and_exhaustion(recorded_run):
    run_dir, _ = recorded_run
    replay = ReplayBackend(run_dir)
    with pytest.raises(ReplayMismatch, match=r"call #0 \(propose\) recorded a reply that is not a valid Verdict"):
        replay.ask(LLMRequest("propose", "s", "u", {}, Verdict))
    replay.ask(LLMRequest("critique", "s", "u", {}, Verdict))
    with pytest.raises(ReplayExhausted, match=r"holds 2 recorded calls; call #2 \(kind 'propose'\)"):
        replay.ask(LLMRequest("propose", "s", "u", {}, Proposal))


def test_replay_of_a_failed_call_fails_the_same_way(fake_llm, tmp_path):
    fake_llm.script(Fail(400, "context length exceeded"))
    with pytest.raises(LLMUnavailable):
        RecordingBackend(openai_backend(fake_llm), tmp_path).ask(LLMRequest("propose", "s", "u", {}, Proposal))
    with pytest.raises(ReplayedError, match="context length exceeded") as info:
        ReplayBackend(tmp_path).ask(LLMRequest("propose", "s", "u", {}, Proposal))
    assert info.value.error_type == "LLMUnavailable"


def test_replay_of_a_broken_file_names_the_line(tmp_path):
    with pytest.raises(ReplayFileError, match=r"llm_calls\.jsonl does not exist"):
        ReplayBackend(tmp_path)
    good = {"index": 0, "kind": "k", "backend": "offline", "request": {"system": "s", "user": "u"},
            "reply": {"accept": True, "reason": "r"}, "latency_ms": 1.0, "started_at": "2026-01-01T00:00:00"}
    (tmp_path / "llm_calls.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ReplayFileError, match=r"llm_calls\.jsonl:2: not a recorded LLM call"):
        ReplayBackend(tmp_path)


def test_context_objects_are_recorded_as_structured_json(tmp_path):
    import dataclasses
    from pathlib import Path

    import numpy as np

    @dataclasses.dataclass
    class Shape:
        n_cells: int
        genes: list[str]

    context = {"shape": Shape(3, ["A"]), "verdict": Verdict(accept=True, reason="r"),
               "means": np.array([0.5, 1.5]), "count": np.int64(7), "path": Path("/data/x.h5ad")}
    offline = OfflineBackend({"critique": lambda ctx: Verdict(accept=True, reason="ok")})
    RecordingBackend(offline, tmp_path).ask(LLMRequest("critique", "s", "u", context, Verdict))
    (record,) = [json.loads(line) for line in (tmp_path / "llm_calls.jsonl").read_text().splitlines()]
    assert record["request"]["context"] == {
        "shape": {"n_cells": 3, "genes": ["A"]}, "verdict": {"accept": True, "reason": "r"},
        "means": [0.5, 1.5], "count": 7, "path": "/data/x.h5ad"}


def test_recording_appends_after_existing_calls(tmp_path):
    offline = OfflineBackend({"critique": lambda ctx: Verdict(accept=ctx["ok"], reason="rules")})
    for ok in (True, False):
        RecordingBackend(offline, tmp_path).ask(LLMRequest("critique", "s", "u", {"ok": ok}, Verdict))
    records = [json.loads(line) for line in (tmp_path / "llm_calls.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reply"]["accept"], r["backend"]) for r in records] == [
        (0, True, "offline"), (1, False, "offline")]


def test_replay_matches_concurrent_calls_by_key_and_old_records_by_order(tmp_path):
    offline = OfflineBackend({"critique": lambda ctx: Verdict(accept=ctx["ok"], reason=ctx["who"])})
    recorder = RecordingBackend(offline, tmp_path)
    for who in ("b", "a"):  # finished in the other order than the replayed run asks them
        recorder.ask(LLMRequest("critique", "s", "u", {"ok": True, "who": who}, Verdict, key=who))
    replay = ReplayBackend(tmp_path)
    assert [replay.ask(LLMRequest("critique", "s", "u", {}, Verdict, key=k)).reason for k in ("a", "b")] == ["a", "b"]

    lines = (tmp_path / "llm_calls.jsonl").read_text().splitlines()
    keyless = [json.dumps({k: v for k, v in json.loads(line).items() if k != "key"}) for line in lines]
    (tmp_path / "llm_calls.jsonl").write_text("\n".join(keyless) + "\n")
    replay = ReplayBackend(tmp_path)
    assert [replay.ask(LLMRequest("critique", "s", "u", {}, Verdict, key=k)).reason for k in ("a", "b")] == ["b", "a"]
    with pytest.raises(ReplayExhausted):
        replay.ask(LLMRequest("critique", "s", "u", {}, Verdict, key="a"))


def test_replay_names_the_key_no_record_matches(tmp_path):
    offline = OfflineBackend({"critique": lambda ctx: Verdict(accept=True, reason="r")})
    RecordingBackend(offline, tmp_path).ask(LLMRequest("critique", "s", "u", {}, Verdict, key="r1.a->b"))
    with pytest.raises(ReplayMismatch, match=r"recorded as kind 'critique' \(key 'r1\.a->b'\) but the replayed run "
                                             r"asked kind 'critique' \(key 'r1\.c->d'\)"):
        ReplayBackend(tmp_path).ask(LLMRequest("critique", "s", "u", {}, Verdict, key="r1.c->d"))
