"""One execution's messages turned into typed events and a capped record of its output.

`ExecutionCollector` listens to the iopub messages of one execute request (see messaging.py) and
keeps at most the output limit of what it printed: past it, streams are only counted, rich output
is dropped, and a `TruncatedEvent` says so once. Tracebacks are trimmed and stripped of terminal
escapes, since everything in them was written by sandboxed code.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from .escapes import strip_escapes
from .events import (
    DisplayEvent,
    ErrorEvent,
    ExecutionResult,
    Outcome,
    ResultEvent,
    StderrEvent,
    StdoutEvent,
    StreamEvent,
    TruncatedEvent,
)
from .messaging import Listener

Emit = Callable[[StreamEvent], None]

MAX_TRACEBACK_ENTRIES = 30
MAX_TRACEBACK_ENTRY_CHARS = 4000
_OUTPUT_KINDS = frozenset({"stream", "display_data", "update_display_data", "execute_result"})


def trim_traceback(lines: Sequence[str]) -> list[str]:
    """Escape-free traceback entries, keeping the last (innermost) ones and capping each entry."""
    kept = [strip_escapes(line) for line in lines[-MAX_TRACEBACK_ENTRIES:]]
    cap = MAX_TRACEBACK_ENTRY_CHARS
    kept = [line if len(line) <= cap else line[:cap] + " […]" for line in kept]
    if len(lines) > MAX_TRACEBACK_ENTRIES:
        kept.insert(0, f"[{len(lines) - MAX_TRACEBACK_ENTRIES} outer traceback entries omitted]")
    return kept


class ExecutionCollector(Listener):
    """Turns the iopub messages of one execution into events and a capped record of its output."""

    def __init__(self, limit: int, emit: Emit) -> None:
        self.limit = limit
        self.emit = emit
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.kept_bytes = 0
        self.stdout_bytes = 0
        self.truncated = False
        self.displays: list[dict[str, Any]] = []
        self.result: str | None = None
        self.error: tuple[str, str, list[str]] | None = None
        self.reply: dict[str, Any] | None = None
        self.idle = False
        self.iopub_gap = False
        self.output_lost = False  # truncated by an iopub gap rather than (only) by the limit
        self.lost = False
        self.done = asyncio.Event()

    def wants(self, msg_type: str) -> bool:
        # Past the limit only streams are still read, to count stdout_bytes; nothing more is kept.
        return not (self.truncated and msg_type in _OUTPUT_KINDS and msg_type != "stream")

    def _truncate(self) -> None:
        if not self.truncated:
            self.truncated = True
            self.kept_bytes = self.limit
            self.emit(TruncatedEvent(limit_bytes=self.limit))

    def _room(self, size: int) -> int:
        """How many of `size` bytes still fit under the limit; marks truncation once they don't."""
        if self.truncated:
            return 0
        room = self.limit - self.kept_bytes
        if size > room:
            self.truncated = True
            self.kept_bytes = self.limit
            return room
        self.kept_bytes += size
        return size

    def _stream(self, name: str, text: str) -> None:
        raw = text.encode("utf-8", "replace")
        if name == "stdout":
            self.stdout_bytes += len(raw)
        was_truncated = self.truncated
        room = self._room(len(raw))
        if room < len(raw):
            text = raw[:room].decode("utf-8", "ignore")
        if text:
            (self.stdout if name == "stdout" else self.stderr).append(text)
            self.emit(StdoutEvent(text=text) if name == "stdout" else StderrEvent(text=text))
        if self.truncated and not was_truncated:
            self.emit(TruncatedEvent(limit_bytes=self.limit))

    def on_iopub(self, msg: dict[str, Any]) -> None:
        kind = msg["msg_type"]
        content = msg["content"]
        if "oversize" in msg:
            if kind in _OUTPUT_KINDS:
                self._truncate()
            elif kind == "error":
                self.error = ("Error", f"[an error of {msg['oversize']} bytes, over the output limit, was dropped]", [])
                self.emit(ErrorEvent(ename=self.error[0], evalue=self.error[1], traceback=[]))
        elif kind == "stream":
            self._stream(content.get("name", "stdout"), content.get("text", ""))
        elif kind in ("display_data", "update_display_data", "execute_result"):
            data = content.get("data", {})
            was_truncated = self.truncated
            size = sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for v in data.values())
            if self._room(size) == size:
                if kind == "execute_result":
                    self.result = data.get("text/plain")
                    self.emit(ResultEvent(data=data))
                else:
                    self.displays.append(data)
                    self.emit(DisplayEvent(data=data, metadata=content.get("metadata", {})))
            elif not was_truncated:
                self.emit(TruncatedEvent(limit_bytes=self.limit))
        elif kind == "error":
            ename, evalue, lines = self._set_error(content)
            self.emit(ErrorEvent(ename=ename, evalue=evalue, traceback=lines))
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle = True
            self._finish_if_complete()

    def on_iopub_gap(self) -> None:
        self.iopub_gap = True
        self._finish_if_complete()

    def _finish_if_complete(self) -> None:
        """Done once the reply came and iopub went idle — or lost messages, idle perhaps among them. After a
        gap the output is marked truncated even when idle came: the connection reopened in time for idle, not
        for what was sent while it was down (a flood of oversized messages, under load: idle, no output)."""
        if self.reply is not None and (self.idle or self.iopub_gap):
            if self.iopub_gap:
                self.output_lost = True
                self._truncate()
            self.done.set()

    def _set_error(self, content: dict[str, Any]) -> tuple[str, str, list[str]]:
        self.error = (
            strip_escapes(str(content.get("ename", "Error"))),
            strip_escapes(str(content.get("evalue", ""))),
            trim_traceback([str(line) for line in content.get("traceback", [])]),
        )
        return self.error

    def on_reply(self, msg: dict[str, Any]) -> None:
        self.reply = msg["content"]
        if self.reply.get("status") == "error" and self.error is None:
            self._set_error(self.reply)
        elif self.reply.get("status") == "aborted" and self.error is None:
            self.error = ("Aborted", "the kernel aborted this execution after an earlier error", [])
        self._finish_if_complete()

    def on_lost(self) -> None:
        self.lost = True
        self.done.set()

    def to_result(self, outcome: Outcome, started: float, **extra: Any) -> ExecutionResult:
        stdout = "".join(self.stdout)
        if self.truncated:
            why = ("the kernel's output connection dropped (a message over the size limit drops it); what it sent "
                   "meanwhile was lost" if self.output_lost else f"more than {self.limit} bytes; the rest was dropped")
            stdout += f"\n[output truncated: {why}]\n"
        fields: dict[str, Any] = dict(
            outcome=outcome,
            stdout=stdout,
            stderr="".join(self.stderr),
            duration_ms=(time.perf_counter() - started) * 1000,
            stdout_bytes=self.stdout_bytes,
            truncated=self.truncated,
            displays=self.displays,
            result=self.result,
        )
        if self.error is not None:
            fields.update(ename=self.error[0], evalue=self.error[1], traceback=self.error[2])
        fields.update(extra)
        return ExecutionResult(**fields)

