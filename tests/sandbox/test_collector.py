"""The execution collector's record when iopub messages are lost (no kernel needed: the order of events is
what is tested, and a real flood only sometimes produces it)."""

from __future__ import annotations

from sandbox import Outcome
from sandbox.collector import ExecutionCollector
from sandbox.events import TruncatedEvent


def _stream(text: str) -> dict:
    return {"msg_type": "stream", "content": {"name": "stdout", "text": text}}


IDLE = {"msg_type": "status", "content": {"execution_state": "idle"}}
REPLY = {"content": {"status": "ok"}}


def test_output_lost_in_an_iopub_gap_is_marked_truncated_even_when_idle_arrives():
    # Oversized messages drop the iopub connection; it reopens in time for the kernel's idle but not for the
    # output sent meanwhile (seen under load in CI: outcome ok, no stdout, not marked truncated).
    events = []
    collector = ExecutionCollector(1000, events.append)
    collector.on_iopub(_stream("before the gap\n"))
    collector.on_iopub_gap()
    collector.on_iopub(IDLE)
    assert not collector.done.is_set()  # the reply is still to come
    collector.on_reply(REPLY)
    assert collector.done.is_set() and collector.truncated
    assert any(isinstance(e, TruncatedEvent) for e in events)
    result = collector.to_result(Outcome.OK, 0.0)
    assert result.stdout.startswith("before the gap\n")
    assert "[output truncated: the kernel's output connection dropped" in result.stdout


def test_a_complete_execution_is_not_marked_truncated():
    collector = ExecutionCollector(1000, lambda event: None)
    collector.on_iopub(_stream("all of it\n"))
    collector.on_iopub(IDLE)
    collector.on_reply(REPLY)
    assert collector.done.is_set() and not collector.truncated
    assert collector.to_result(Outcome.OK, 0.0).stdout == "all of it\n"
