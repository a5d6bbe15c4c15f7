"""A scripted OpenAI-compatible chat server on loopback: the only stand-in allowed in the test suite.

It is a real HTTP server (stdlib `http.server` in a thread) implementing `POST /v1/chat/completions`
(whole replies, or server-sent events when the request asks `stream`) and `GET /v1/models`. Each request consumes the next step of a script:

    fake_llm.script(Reply('{"x": 1}'), Fail(429, retry_after="1"), Reply(lambda req: ...))

A `Reply` answers 200 with the content (a string, or a callable of the request JSON returning one);
a `Fail` answers an OpenAI-style error. Every received request is kept in `fake_llm.requests`
(`RecordedHTTPRequest`: path, headers, body JSON, arrival time). A request past the end of the
script gets a 400 naming the script length, so a test sees a clear error instead of hanging.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

Content = str | Callable[[dict[str, Any]], str]


@dataclass
class Reply:
    content: Content
    prompt_tokens: int = 10
    completion_tokens: int = 5
    delay: float = 0.0  # seconds before answering (to provoke client timeouts)
    model: str | None = None  # the model name reported back; default: the requested one
    finish_reason: str = "stop"  # "length": the reply was cut by the output cap
    chunk_delay: float = 0.0  # seconds between the chunks of a streamed reply


@dataclass
class Fail:
    status: int
    message: str = "scripted failure"
    retry_after: str | None = None  # the Retry-After header: seconds or an HTTP date
    headers: dict[str, str] = field(default_factory=dict)


Step = Reply | Fail


@dataclass
class RecordedHTTPRequest:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any]
    received_at: float  # time.monotonic()
    answered_at: float | None = None  # when the reply was sent (None for a scripted failure)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])

    @property
    def text(self) -> str:
        """All message contents joined: what the model was shown."""
        return "\n".join(str(m.get("content", "")) for m in self.messages)


class FakeLLMServer:
    def __init__(self) -> None:
        self.requests: list[RecordedHTTPRequest] = []
        self._steps: list[Step] = []
        self._position = 0
        self._lock = threading.Lock()
        self._stopped = False
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-llm", daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, *steps: Step) -> FakeLLMServer:
        """Replace the script and forget earlier requests."""
        with self._lock:
            self._steps = list(steps)
            self._position = 0
            self.requests.clear()
        return self

    @property
    def remaining(self) -> int:
        return len(self._steps) - self._position

    def start(self) -> FakeLLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (idempotent): later requests are refused at the TCP level."""
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _next_step(self, request: RecordedHTTPRequest) -> Step:
        with self._lock:
            self.requests.append(request)
            if self._position >= len(self._steps):
                return Fail(400, f"fake LLM server: script exhausted after {len(self._steps)} steps")
            step = self._steps[self._position]
            self._position += 1
            return step


def _handler_for(server: FakeLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            return

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            else:
                self._send(404, _error_body("not found", 404))

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                self._send(400, _error_body("request body is not JSON", 400))
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, _error_body(f"no route {self.path}", 404))
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            recorded = RecordedHTTPRequest(self.path, headers, body, time.monotonic())
            step = server._next_step(recorded)
            if isinstance(step, Fail):
                headers = dict(step.headers)
                if step.retry_after is not None:
                    headers["Retry-After"] = step.retry_after
                self._send(step.status, _error_body(step.message, step.status), headers)
                return
            if step.delay:
                time.sleep(step.delay)
            content = step.content(body) if callable(step.content) else step.content
            recorded.answered_at = time.monotonic()
            if body.get("stream"):
                self._stream(step, body, content)
                return
            self._send(200, {
                "id": f"chatcmpl-fake-{len(server.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": step.model or body.get("model", "fake-model"),
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": step.finish_reason,
                }],
                "usage": {
                    "prompt_tokens": step.prompt_tokens,
                    "completion_tokens": step.completion_tokens,
                    "total_tokens": step.prompt_tokens + step.completion_tokens,
                },
            })

        def _stream(self, step: Reply, body: dict[str, Any], content: str) -> None:
            """The reply as OpenAI streams it: content chunks (4 characters each), the finish reason, the
            usage (when `stream_options.include_usage`), then `[DONE]`."""
            base = {"id": f"chatcmpl-fake-{len(server.requests)}", "object": "chat.completion.chunk",
                    "created": int(time.time()), "model": step.model or body.get("model", "fake-model")}
            pieces = [content[i:i + 4] for i in range(0, len(content), 4)]
            events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece},
                                            "finish_reason": None}]} for piece in pieces]
            events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": step.finish_reason}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append({**base, "choices": [], "usage": {
                    "prompt_tokens": step.prompt_tokens, "completion_tokens": step.completion_tokens,
                    "total_tokens": step.prompt_tokens + step.completion_tokens}})
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for event in events:
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                    if step.chunk_delay:
                        time.sleep(step.chunk_delay)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test); nothing to answer

    return Handler


def _error_body(message: str, status: int) -> dict[str, Any]:
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    """A running scripted server; set its script with `fake_llm.script(...)`."""
    server = FakeLLMServer().start()
    try:
        yield server
    finally:
        server.stop()
