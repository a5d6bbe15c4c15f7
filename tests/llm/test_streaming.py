"""Streamed replies from the scripted server: tokens so far reported while the reply arrives, the whole
reply validated and costed as a non-streamed one, a reply cut by the cap continued, and a server that
refuses streaming asked again without it."""

from __future__ import annotations

import io
import json

from pydantic import BaseModel

from fake_llm_server import Fail, Reply

from service.llm import LLMRequest, OpenAIBackend


class Summary(BaseModel):
    text: str
    n: int


REQUEST = LLMRequest(kind="summary", system="Summarise.", user="Go.", context={}, schema=Summary)


def _backend(fake_llm, seen: list) -> OpenAIBackend:
    return OpenAIBackend(fake_llm.base_url, "fake-model", "sk-x", stream=True, max_attempts=1,
                         on_tokens=lambda kind, n: seen.append((kind, n)), progress_interval=0.05)


def test_a_streamed_reply_reports_its_tokens_as_they_arrive(fake_llm):
    text = json.dumps({"text": "x" * 200, "n": 3})  # 55 chunks of 4 characters
    fake_llm.script(Reply(text, prompt_tokens=40, completion_tokens=60, chunk_delay=0.005))
    seen: list = []
    answer = _backend(fake_llm, seen).answer(REQUEST)
    assert answer.reply == Summary(text="x" * 200, n=3)
    counts = [n for kind, n in seen if kind == "summary"]
    assert len(counts) >= 3 and counts == sorted(counts) and counts[-1] == -(-len(text) // 4)
    assert (answer.stats.prompt_tokens, answer.stats.completion_tokens) == (40, 60)
    assert fake_llm.requests[0].body["stream"] is True
    assert answer.transcript.exchanges[0].params["stream"] is True


def test_a_streamed_reply_cut_by_the_cap_is_continued(fake_llm):
    text = json.dumps({"text": "abc", "n": 1})
    fake_llm.script(Reply(text[:10], finish_reason="length"), Reply(text[10:]))
    seen: list = []
    assert _backend(fake_llm, seen).ask(REQUEST) == Summary(text="abc", n=1)
    assert len(fake_llm.requests) == 2 and fake_llm.requests[1].body["stream"] is True


def test_a_server_that_refuses_streaming_is_asked_without_it(fake_llm):
    fake_llm.script(Fail(400, "stream is not supported by this server"), Reply(json.dumps({"text": "a", "n": 2})))
    seen: list = []
    backend = _backend(fake_llm, seen)
    assert backend.ask(REQUEST) == Summary(text="a", n=2)
    assert "stream" not in fake_llm.requests[1].body and backend.stream is False


def test_the_cli_progress_shows_tokens_so_far_and_every_debug_step(fake_llm):
    from rich.console import Console

    from service.pipeline import ProgressEvent, RichProgress

    console = Console(file=io.StringIO(), width=200)
    with RichProgress(console) as progress:
        fake_llm.script(Reply(json.dumps({"text": "t" * 40, "n": 1})))
        OpenAIBackend(fake_llm.base_url, "fake-model", "sk-x", stream=True, max_attempts=1,
                      on_tokens=lambda kind, n: progress(ProgressEvent("llm", f"{kind}: {n} tokens so far"))
                      ).ask(REQUEST)
        assert progress.state["llm"] == "summary: 15 tokens so far" and progress.state["phase"] == "-"
        progress(ProgressEvent("debug", "train failed (error): AttributeError", attempt=1))
        progress(ProgressEvent("debug", "patch did not apply: train.py: the search text occurs 0 times", attempt=1))
    printed = console.file.getvalue()
    assert "tokens so far" not in printed and "patch did not apply: train.py" in printed
