"""Execution over Jupyter messaging: the kernel client and the backend-independent `Sandbox`.

`KernelClient` owns the ZMQ sockets of one kernel connection (a `jupyter_client` Session signs and
parses the messages) with one reader task per channel that routes every message to the request that
caused it, by parent `msg_id`. Nothing polls on the hot path: an execution registers a collector, the
readers feed it, and the caller awaits one event. A ZMQ socket monitor on the shell socket reports
the moment the kernel's end of the connection goes away, which is how a dead kernel is noticed
without heartbeat polling.

Everything the kernel sends is hostile input (the sandboxed code holds the key and can write raw
bytes on the connection). So what the host buffers is bounded: a message above `message_limit` is
cut by the relay in between (relay.py; libzmq has no limit on a message, only on a frame), a frame
above `frame_limit` drops the connection (ZMQ's MAXMSGSIZE; the largest honest frame is a file chunk
or an output at the output limit), the receive queues hold a few messages (RCVHWM: the kernel's own
send queue, in the sandbox's memory, takes the rest), and a content above the output limit is never
decoded.

`Sandbox` turns that into outcomes (ok, error, timeout, killed, died) using a `KernelHost` — what a
backend provides: restart the kernel in place, say why it exited, start it again, destroy it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import zmq
import zmq.asyncio
from jupyter_client.session import Session
from zmq.utils.monitor import parse_monitor_message

from .errors import SandboxClosedError, SandboxDeadError, SandboxStartError
from .escapes import strip_escapes
from .events import (
    DisplayEvent,
    ErrorEvent,
    ExecutionResult,
    Outcome,
    ResultEvent,
    StatusEvent,
    StderrEvent,
    StdoutEvent,
    StreamEvent,
    TruncatedEvent,
)
from .relay import KernelRelay
from .spec import SandboxSpec

log = logging.getLogger(__name__)

Emit = Callable[[StreamEvent], None]
EventCallback = Callable[[StreamEvent], Any]
_Runner = Callable[[Emit], Awaitable[tuple[ExecutionResult, "ExecutionCollector"]]]

MAX_TRACEBACK_ENTRIES = 30
MAX_TRACEBACK_ENTRY_CHARS = 4000
# How long a dead kernel's host may take to report its exit status before we give up asking.
EXIT_CAUSE_TIMEOUT_S = 10.0
# While waiting for a (re)started kernel, how often to ask whether its host stopped meanwhile.
HOST_CHECK_INTERVAL_S = 0.5
# Bytes of file data per transfer message (see files.py): with the output limit, the largest frame an
# honest kernel sends.
TRANSFER_CHUNK_BYTES = 4 << 20
# Room for a message's JSON framing above its payload.
FRAME_SLACK_BYTES = 256 << 10
# What libzmq may queue for us per channel before it stops reading from the kernel.
HOST_QUEUE_BYTES = 32 << 20
# Header, parent header and metadata together; an honest kernel sends a few hundred bytes.
MAX_HEADERS_BYTES = 64 << 10
# A connection dropping again within a second is reopened after a growing delay: a kernel that
# keeps breaking its connection (oversized messages) must not keep the host's loop busy.
REOPEN_DELAY_S = (0.05, 1.0)
# How long a request waits for a reopened iopub connection to deliver again before it is sent anyway.
IOPUB_SETTLE_S = 2.0
_CHANNELS = ("shell", "iopub", "control")
_OUTPUT_KINDS = frozenset({"stream", "display_data", "update_display_data", "execute_result"})

_zmq_context: zmq.asyncio.Context | None = None


def _context() -> zmq.asyncio.Context:
    """One ZMQ context (one I/O thread) for every kernel connection of this process."""
    global _zmq_context
    if _zmq_context is None:
        ctx = zmq.asyncio.Context()
        # A client usually connects before the kernel has bound its ipc sockets; the default 100 ms
        # reconnect interval would then add up to 100 ms to every cold start.
        ctx.setsockopt(zmq.RECONNECT_IVL, 10)
        ctx.setsockopt(zmq.LINGER, 0)
        _zmq_context = ctx
    return _zmq_context


def frame_limit(output_limit: int) -> int:
    """The largest frame the host takes from a kernel."""
    return max(output_limit, TRANSFER_CHUNK_BYTES) + FRAME_SLACK_BYTES


def message_limit(output_limit: int) -> int:
    """The largest message (all its frames) the host takes from a kernel."""
    return frame_limit(output_limit) + FRAME_SLACK_BYTES


def connection_info(ip: str, key: str) -> dict[str, Any]:
    """A Jupyter connection over ipc: sockets are files named `{ip}-{port}`, so ports just number them."""
    return {
        "transport": "ipc",
        "ip": ip,
        "shell_port": 1,
        "iopub_port": 2,
        "stdin_port": 3,
        "hb_port": 4,
        "control_port": 5,
        "key": key,
        "signature_scheme": "hmac-sha256",
        "kernel_name": "",
    }


def describe_exit(code: int, oom: bool = False) -> str:
    """The `died_cause` text for a kernel host's exit status (the supervisor exits 128 + signal)."""
    if oom:
        return "out of memory"
    if code < 0:
        return f"signal {-code}"
    if code > 128:
        return f"signal {code - 128}"
    return f"exit code {code}"


def trim_traceback(lines: Sequence[str]) -> list[str]:
    """Escape-free traceback entries, keeping the last (innermost) ones and capping each entry."""
    kept = [strip_escapes(line) for line in lines[-MAX_TRACEBACK_ENTRIES:]]
    cap = MAX_TRACEBACK_ENTRY_CHARS
    kept = [line if len(line) <= cap else line[:cap] + " […]" for line in kept]
    if len(lines) > MAX_TRACEBACK_ENTRIES:
        kept.insert(0, f"[{len(lines) - MAX_TRACEBACK_ENTRIES} outer traceback entries omitted]")
    return kept


class Listener:
    """Receives the messages whose parent is one request.

    A message whose content was over the output limit arrives with `content` empty and its size in
    `msg["oversize"]`.
    """

    def wants(self, msg_type: str) -> bool:
        """Whether an iopub message of this type is worth decoding."""
        return True

    def on_iopub(self, msg: dict[str, Any]) -> None:
        pass

    def on_iopub_gap(self) -> None:
        """The iopub connection dropped (e.g. an oversized frame): messages may have been lost."""

    def on_reply(self, msg: dict[str, Any]) -> None:
        pass

    def on_lost(self) -> None:
        pass


class ReplyWaiter(Listener):
    """Keeps the latest shell reply to any of the requests it listens to."""

    def __init__(self) -> None:
        self.reply: dict[str, Any] | None = None
        self.done = asyncio.Event()

    def on_reply(self, msg: dict[str, Any]) -> None:
        self.reply = msg
        self.done.set()

    def on_lost(self) -> None:
        self.done.set()


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
            self._set_error(content)
            self.emit(ErrorEvent(ename=self.error[0], evalue=self.error[1], traceback=self.error[2]))
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle = True
            self._finish_if_complete()

    def on_iopub_gap(self) -> None:
        self.iopub_gap = True
        self._finish_if_complete()

    def _finish_if_complete(self) -> None:
        """Done once the reply came and iopub went idle — or lost messages, idle perhaps among them."""
        if self.reply is not None and (self.idle or self.iopub_gap):
            if not self.idle:
                self._truncate()
            self.done.set()

    def _set_error(self, content: dict[str, Any]) -> None:
        self.error = (
            strip_escapes(str(content.get("ename", "Error"))),
            strip_escapes(str(content.get("evalue", ""))),
            trim_traceback([str(line) for line in content.get("traceback", [])]),
        )

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
            stdout += f"\n[output truncated: more than {self.limit} bytes; the rest was dropped]\n"
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


class KernelClient:
    """Jupyter messaging with one kernel over ZMQ (ipc), routed by parent message id."""

    def __init__(self, connection_info: dict[str, Any], output_limit: int = 1 << 20) -> None:
        self.session = Session(
            key=connection_info["key"].encode(), signature_scheme=connection_info["signature_scheme"]
        )
        self._info = connection_info
        self.frame_limit = frame_limit(output_limit)
        self.content_limit = output_limit + FRAME_SLACK_BYTES
        self.queue_limit = max(2, HOST_QUEUE_BYTES // message_limit(output_limit))
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._monitors: dict[str, zmq.asyncio.Socket] = {}
        self._tasks: dict[str, list[asyncio.Task]] = {}
        self._drops: dict[str, tuple[float, float]] = {}  # channel: (when it last dropped, reopen delay)
        self._listeners: dict[str, Listener] = {}
        self._iopub_session: str | None = None
        self._iopub_seen = asyncio.Event()
        # Set while iopub is known to deliver: cleared when it drops, set by the next message on it
        # (ipykernel greets each new subscriber with `iopub_welcome`).
        self._iopub_live = asyncio.Event()
        self.session_id: str | None = None
        self.kernel_info: dict[str, Any] = {}
        # Set when the kernel's end of the shell connection went away (it exited or was killed).
        self.lost = asyncio.Event()

    def start(self) -> None:
        for channel in _CHANNELS:
            self._open(channel)

    def _open(self, channel: str, delay: float = 0.0) -> None:
        """A fresh socket for `channel` (connected after `delay` s), its reader, and a monitor that
        reports the connection dropping."""
        socket_type, handle, on_drop = {
            "shell": (zmq.DEALER, self._on_shell, self._on_shell_lost),
            "iopub": (zmq.SUB, self._on_iopub, self._on_iopub_gap),
            "control": (zmq.DEALER, lambda msg: None, lambda: None),
        }[channel]
        socket = _context().socket(socket_type)
        self._sockets[channel] = socket
        # Before connect(): libzmq copies them into each connection as it is made.
        socket.setsockopt(zmq.MAXMSGSIZE, self.frame_limit)
        socket.setsockopt(zmq.RCVHWM, self.queue_limit)
        if socket_type == zmq.SUB:
            socket.setsockopt(zmq.SUBSCRIBE, b"")
        else:
            socket.setsockopt(zmq.IDENTITY, self.session.bsession)
        monitor = self._monitors[channel] = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        url = f"ipc://{self._info['ip']}-{self._info[f'{channel}_port']}"
        if delay:
            # Sends meanwhile wait in the socket's queue.
            asyncio.get_running_loop().call_later(delay, lambda: socket.closed or socket.connect(url))
        else:
            socket.connect(url)

        def dropped() -> None:
            on_drop()
            # libzmq reconnects after a connection error, but gives a connection up for good after a
            # protocol error (a frame over MAXMSGSIZE) or the relay's cut: a fresh socket either way.
            self._close(channel)
            self._open(channel, self._reopen_delay(channel))

        self._tasks[channel] = [
            asyncio.create_task(self._read(socket, handle)),
            asyncio.create_task(self._watch(monitor, dropped)),
        ]

    def _reopen_delay(self, channel: str) -> float:
        now = time.monotonic()
        last, delay = self._drops.get(channel, (-1e9, 0.0))
        low, high = REOPEN_DELAY_S
        delay = min(high, max(low, delay * 2)) if now - last < high else 0.0
        self._drops[channel] = (now, delay)
        return delay

    def _close(self, channel: str) -> None:
        for task in self._tasks.pop(channel, []):
            task.cancel()
        socket, monitor = self._sockets.pop(channel, None), self._monitors.pop(channel, None)
        if socket is not None:
            with contextlib.suppress(zmq.ZMQError):
                socket.disable_monitor()
            socket.close(linger=0)
        if monitor is not None:
            monitor.close(linger=0)

    async def _read(self, socket: zmq.asyncio.Socket, handle: Callable[[dict[str, Any]], None]) -> None:
        # recv_multipart on the asyncio socket, not a Poller: a poller's wake-up can be lost when a
        # send on the same socket consumes the edge-triggered ZMQ fd event (seen as a reply that
        # never arrives); a pending recv future is re-armed by pyzmq.
        while True:
            try:
                frames = await socket.recv_multipart()
            except zmq.ZMQError:
                if socket.closed:
                    return
                log.debug("ZMQ error on a kernel socket", exc_info=True)
                continue
            try:
                _, msg_frames = self.session.feed_identities(frames)
                if sum(len(f) for f in msg_frames[1:4]) > MAX_HEADERS_BYTES:
                    raise ValueError("message headers over the limit")
                # The content stays packed: decoded later, only if someone wants it and it is small.
                msg = self.session.deserialize(msg_frames, content=False)
                if not (isinstance(msg["parent_header"], dict) and isinstance(msg["msg_type"], str)):
                    raise ValueError("malformed message headers")
                handle(msg)
            except Exception:  # noqa: BLE001 - anything the kernel sends is untrusted; never stop reading
                # Not a well-formed message of our kernel (bad signature, malformed frames or fields).
                log.debug("dropped an unreadable message from the kernel", exc_info=True)

    def _unpack(self, msg: dict[str, Any]) -> bool:
        """Decode the content in place (left empty, with `oversize`, above the limit); False if unreadable."""
        packed = msg["content"]
        if len(packed) > self.content_limit:
            msg["content"] = {}
            msg["oversize"] = len(packed)
            return True
        try:
            content = self.session.unpack(packed)
        except Exception:  # noqa: BLE001 - untrusted bytes
            return False
        msg["content"] = content if isinstance(content, dict) else {}
        return True

    def _on_shell(self, msg: dict[str, Any]) -> None:
        listener = self._listeners.get(msg["parent_header"].get("msg_id", ""))
        if listener is None or not self._unpack(msg):
            return
        if "oversize" in msg:
            msg["content"] = {
                "status": "error",
                "ename": "OutputTooLarge",
                "evalue": f"the kernel's reply of {msg['oversize']} bytes is over the output limit",
                "traceback": [],
            }
        listener.on_reply(msg)

    def _on_iopub(self, msg: dict[str, Any]) -> None:
        self._iopub_live.set()
        session = msg["header"].get("session")
        if session != self._iopub_session:
            self._iopub_session = session
            self._iopub_seen.set()
        listener = self._listeners.get(msg["parent_header"].get("msg_id", ""))
        if listener is not None and listener.wants(msg["msg_type"]) and self._unpack(msg):
            listener.on_iopub(msg)

    def _on_shell_lost(self) -> None:
        self.lost.set()
        for listener in list(self._listeners.values()):
            listener.on_lost()

    def _on_iopub_gap(self) -> None:
        self._iopub_live.clear()
        for listener in list(self._listeners.values()):
            listener.on_iopub_gap()

    async def _watch(self, monitor: zmq.asyncio.Socket, on_disconnected: Callable[[], None]) -> None:
        while True:
            try:
                frames = await monitor.recv_multipart()
            except zmq.ZMQError:
                return
            if parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED:
                on_disconnected()

    async def iopub_ready(self, timeout: float = IOPUB_SETTLE_S) -> bool:
        """Whether iopub delivers (waiting up to `timeout` for a reopened connection to)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._iopub_live.wait()
        return self._iopub_live.is_set()

    async def wait_ready(self, timeout: float, previous_session: str | None = None) -> None:
        """Until a kernel (other than `previous_session`) answers on shell and iopub reaches us.

        kernel_info requests are re-sent with a growing interval, since one sent to a kernel that is
        being replaced is lost with it; a reply to any of them counts (a booting kernel answers the
        queued ones all at once).
        """
        waiter = ReplyWaiter()
        sent: list[str] = []
        interval = 0.05
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg_id = self._send(self._sockets["shell"], "kernel_info_request", {}, waiter)
                    sent.append(msg_id)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(interval):
                            while not self._answered(waiter, previous_session):
                                waiter.done.clear()
                                await waiter.done.wait()
                    if self._answered(waiter, previous_session):
                        session = waiter.reply["header"]["session"]
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(interval):
                                while self._iopub_session != session:
                                    self._iopub_seen.clear()
                                    await self._iopub_seen.wait()
                        if self._iopub_session == session:
                            self.session_id = session
                            self.kernel_info = waiter.reply["content"]
                            self.lost.clear()
                            return
                    interval = min(interval * 2, 0.5)
        finally:
            for msg_id in sent:
                self._listeners.pop(msg_id, None)

    @staticmethod
    def _answered(waiter: ReplyWaiter, previous_session: str | None) -> bool:
        return waiter.reply is not None and waiter.reply["header"].get("session") not in (None, previous_session)

    def _send(
        self,
        socket: zmq.asyncio.Socket,
        msg_type: str,
        content: dict[str, Any],
        listener: Listener | None = None,
        buffers: list[Any] | None = None,
    ) -> str:
        """Sign and send one message; returns its msg_id (the listener is registered first).

        Sent through the asyncio socket itself, not `Session.send` (which sends on a synchronous
        shadow socket): a send can consume the edge-triggered ZMQ fd event of a reply that just
        arrived, and only pyzmq's own send path re-arms the pending receive — otherwise that reply
        sits unread in the socket.
        """
        msg = self.session.msg(msg_type, content)
        msg_id = msg["header"]["msg_id"]
        if listener is not None:
            self._listeners[msg_id] = listener
        frames = self.session.serialize(msg)
        if buffers:
            frames.extend(buffers)
        socket.send_multipart(frames, copy=False)
        return msg_id

    def execute(
        self,
        code: str,
        listener: Listener,
        *,
        silent: bool = False,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
    ) -> str:
        content = {
            "code": code,
            "silent": silent,
            "store_history": store_history,
            "user_expressions": user_expressions or {},
            "allow_stdin": False,
            "stop_on_error": False,
        }
        return self._send(self._sockets["shell"], "execute_request", content, listener)

    def send_shell(
        self, msg_type: str, content: dict[str, Any], listener: Listener | None = None, buffers: list[Any] | None = None
    ) -> str:
        return self._send(self._sockets["shell"], msg_type, content, listener, buffers)

    def forget(self, msg_id: str) -> None:
        self._listeners.pop(msg_id, None)

    def interrupt(self) -> None:
        """Ask the kernel (control channel) to SIGINT its process group; does not wait."""
        self._send(self._sockets["control"], "interrupt_request", {})

    async def close(self) -> None:
        tasks = [task for channel_tasks in self._tasks.values() for task in channel_tasks]
        for channel in list(self._sockets):
            self._close(channel)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for listener in list(self._listeners.values()):
            listener.on_lost()
        self._listeners.clear()


class KernelHost(Protocol):
    """Where a kernel runs (a container, a host process): what `Sandbox` needs beyond messaging."""

    async def restart_kernel(self) -> None:
        """Replace the kernel process in place (workspace kept); returns once asked, not when ready."""

    async def exit_cause(self, timeout: float) -> str | None:
        """Why the kernel's host stopped ('out of memory', 'exit code 1', 'signal 9'); None if running."""

    async def revive(self) -> None:
        """Start the host afresh, stopped or not (a fresh kernel; state and workspace are lost)."""

    async def destroy(self) -> None:
        """Stop and remove everything; idempotent."""

    async def logs(self) -> str:
        """The tail of the kernel host's own output, for start-up errors."""


_DONE = object()


def _ignore(event: StreamEvent) -> None:
    pass


class Sandbox:
    """One kernel in one sandbox. Executions and file transfers run one at a time, in call order."""

    def __init__(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        host: KernelHost,
        connection_info: dict[str, Any],
        *,
        workspace: str,
        isolated: bool,
        data_root: str = "/data",
    ) -> None:
        self.id = sandbox_id
        self.spec = spec
        self.workspace = workspace
        self.isolated = isolated
        self.data_root = data_root
        self._host = host
        self._relay = KernelRelay(connection_info, message_limit(spec.output_limit))
        self._client = KernelClient(self._relay.info, spec.output_limit)
        self._lock = asyncio.Lock()
        self._closed = False
        self._dead: str | None = None
        # Set up lazily by the file transfer code in each new kernel (see files.py).
        self.files_channel: Any = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"dead ({self._dead})" if self._dead else "ready"
        return f"<Sandbox {self.id} {self.spec.image} {state}{'' if self.isolated else ' NOT ISOLATED'}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dead(self) -> str | None:
        """Why the kernel died, or None while it lives."""
        return self._dead

    @property
    def healthy(self) -> bool:
        """Open, alive and connected, known without a round trip to the kernel."""
        return not (self._closed or self._dead or self._client.lost.is_set())

    @property
    def client(self) -> KernelClient:
        return self._client

    @property
    def lock(self) -> asyncio.Lock:
        return self._lock

    async def start(self) -> None:
        """Connect and wait for the kernel; on any failure destroy the host and raise SandboxStartError."""
        try:
            await self._relay.start()
            self._client.start()
            await self._wait_kernel()
        except BaseException as exc:
            reason = await self._why_no_kernel(exc, "connecting to it failed")
            logs = await self._host.logs()
            await self.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            tail = f"; its output ended with:\n{strip_escapes(logs[-2000:])}" if logs.strip() else ""
            raise SandboxStartError(f"sandbox {self.id}: the kernel did not start, {reason}{tail}") from None

    async def _wait_kernel(self, previous_session: str | None = None) -> None:
        """Until a (re)started kernel answers: TimeoutError after start_timeout, _HostStopped as soon
        as its host stops (a kernel dying at boot is reported at once, not after the timeout)."""
        ready = asyncio.ensure_future(self._client.wait_ready(self.spec.start_timeout, previous_session))
        try:
            while not ready.done():
                await asyncio.wait({ready}, timeout=HOST_CHECK_INTERVAL_S)
                if not ready.done() and (cause := await self._host.exit_cause(timeout=0)):
                    raise _HostStopped(cause)
            ready.result()
        finally:
            if not ready.done():
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ready

    def check_usable(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        if self._dead:
            raise SandboxDeadError(f"sandbox {self.id} died ({self._dead}); call restart() for a fresh kernel")

    # --- execution -------------------------------------------------------------------------

    async def execute(
        self, code: str, timeout: float | None = None, on_event: EventCallback | None = None
    ) -> ExecutionResult:
        """Run code in the kernel; events go to `on_event` (a function or a coroutine function)."""
        result, _ = await self._with_events(lambda emit: self._run(code, timeout, emit), on_event)
        return result

    async def stream(self, code: str, timeout: float | None = None) -> AsyncIterator[StreamEvent | ExecutionResult]:
        """Events as they happen, then the `ExecutionResult` as the last item.

        Leaving early (break, cancellation) interrupts the code; wrap in `contextlib.aclosing` to
        make that immediate rather than at garbage collection.
        """
        async for item in self._events(lambda emit: self._run(code, timeout, emit)):
            yield item[0] if isinstance(item, tuple) else item

    async def run_command(
        self,
        argv: Sequence[str],
        cwd: str | None = None,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
    ) -> ExecutionResult:
        """Run a process inside the sandbox, its output streamed; `ok` only for exit code 0."""
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"run_command: expected a non-empty list of strings, got {argv!r}")
        code = _RUN_COMMAND.format(argv=json.dumps(list(argv)), cwd=json.dumps(cwd or self.workspace))
        result, collector = await self._with_events(
            lambda emit: self._run(
                code, timeout, emit, store_history=False, user_expressions={"rc": "__cellforge_rc__"}
            ),
            on_event,
        )
        if result.outcome is not Outcome.OK:
            return result
        expr = (collector.reply or {}).get("user_expressions", {}).get("rc", {})
        exit_code = int(expr.get("data", {}).get("text/plain", "-1"))
        if exit_code == 0:
            return result.model_copy(update={"exit_code": 0, "result": None})
        return result.model_copy(
            update={
                "outcome": Outcome.ERROR,
                "exit_code": exit_code,
                "result": None,
                "ename": "CommandFailed",
                "evalue": f"{argv[0]} exited with code {exit_code}",
            }
        )

    async def _with_events(
        self, run: _Runner, on_event: EventCallback | None
    ) -> tuple[ExecutionResult, ExecutionCollector]:
        if on_event is None:
            return await run(_ignore)
        if not asyncio.iscoroutinefunction(on_event):
            return await run(_safe(on_event))
        async for item in self._events(run):
            if isinstance(item, tuple):
                return item
            try:
                await on_event(item)
            except Exception:
                log.exception("an on_event callback raised; the execution goes on")
        raise AssertionError("unreachable: _events always ends with the result")

    async def _events(self, run: _Runner) -> AsyncIterator[Any]:
        """The events of one run as they happen, then its (result, collector)."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        task = asyncio.ensure_future(run(queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(_DONE))
        try:
            while (item := await queue.get()) is not _DONE:
                yield item
            yield task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(
        self,
        code: str,
        timeout: float | None,
        emit: Emit,
        *,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
    ) -> tuple[ExecutionResult, ExecutionCollector]:
        timeout = self.spec.timeout if timeout is None else timeout
        self.check_usable()
        async with self._lock:
            self.check_usable()
            started = time.perf_counter()
            collector = ExecutionCollector(self.spec.output_limit, emit)
            if self._client.lost.is_set():
                return await self._died(collector, started), collector
            iopub_live = await self._client.iopub_ready()
            msg_id = self._client.execute(
                code, collector, store_history=store_history, user_expressions=user_expressions
            )
            if not iopub_live:
                collector.on_iopub_gap()  # its output may not reach us: finish on the reply
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await collector.done.wait()
                if collector.lost:
                    return await self._died(collector, started), collector
                if collector.done.is_set():
                    outcome = Outcome.ERROR if collector.error else Outcome.OK
                    return collector.to_result(outcome, started), collector
                return await self._stop_overrun(collector, started, timeout), collector
            except asyncio.CancelledError:
                # The caller gave up (e.g. a client disconnected): don't leave the code running.
                if not self._client.lost.is_set():
                    self._client.interrupt()
                raise
            finally:
                self._client.forget(msg_id)

    async def _stop_overrun(self, collector: ExecutionCollector, started: float, timeout: float) -> ExecutionResult:
        """Interrupt; if the code ignores it for `interrupt_grace` seconds, restart the kernel."""
        collector.emit(StatusEvent(state="interrupting", detail=f"timed out after {timeout:g}s"))
        self._client.interrupt()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.spec.interrupt_grace):
                await collector.done.wait()
        if collector.lost:
            return await self._died(collector, started)
        if collector.done.is_set():
            return collector.to_result(Outcome.TIMEOUT, started)
        detail = f"interrupt ignored for {self.spec.interrupt_grace:g}s; restarting the kernel, its state is lost"
        collector.emit(StatusEvent(state="restarting", detail=detail))
        try:
            await self._restart_kernel()
        except SandboxStartError:
            collector.emit(StatusEvent(state="died", detail=self._dead or ""))
            return collector.to_result(Outcome.DIED, started, died_cause=self._dead, state_lost=True)
        collector.emit(StatusEvent(state="restarted", detail="fresh kernel; variables and imports are gone"))
        return collector.to_result(Outcome.KILLED, started, state_lost=True)

    async def _died(self, collector: ExecutionCollector, started: float) -> ExecutionResult:
        cause = await self._host.exit_cause(timeout=EXIT_CAUSE_TIMEOUT_S) or "kernel connection lost"
        self._dead = cause
        collector.emit(StatusEvent(state="died", detail=cause))
        return collector.to_result(Outcome.DIED, started, died_cause=cause, state_lost=True)

    async def _restart_kernel(self, revive: bool = False) -> None:
        """A new kernel in place (or, with `revive`, a restarted host). When none answers, the sandbox
        is dead (a later restart revives it) and SandboxStartError says why."""
        previous = self._client.session_id
        self.files_channel = None
        try:
            await (self._host.revive() if revive else self._host.restart_kernel())
            await self._wait_kernel(previous)
        except Exception as exc:  # noqa: BLE001 - whatever stopped it, the sandbox is dead and says why
            why = await self._why_no_kernel(exc, "the restart failed")
            self._dead = f"the kernel did not come back after a restart, {why}"
            raise SandboxStartError(f"sandbox {self.id}: {self._dead}") from None

    async def _why_no_kernel(self, exc: BaseException, failure: str) -> str:
        """Why a (re)started kernel did not answer, for an error message."""
        cause = exc.cause if isinstance(exc, _HostStopped) else await self._host.exit_cause(timeout=0.5)
        if cause:
            return f"it stopped ({cause})"
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.spec.start_timeout:g}s"
        return f"{failure} ({type(exc).__name__}: {exc})"

    # --- control -----------------------------------------------------------------------------

    async def interrupt(self) -> None:
        """SIGINT the running code (KeyboardInterrupt in the kernel); does not wait for it to stop."""
        self.check_usable()
        self._client.interrupt()

    async def restart(self) -> None:
        """A fresh kernel. State is lost; the workspace is kept unless the sandbox had died."""
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        if not self._dead and not self._client.lost.is_set():
            # Waiting for the lock would wait for a running execution; interrupt it first.
            self._client.interrupt()
            async with self._lock:
                await self._restart_kernel()
            return
        async with self._lock:
            await self._restart_kernel(revive=True)
            self._dead = None

    async def close(self) -> None:
        """Stop the kernel and remove the sandbox (container, host folders); idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._client.close()
        await self._relay.close()
        await self._host.destroy()

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- files (implemented in files.py) -----------------------------------------------------

    async def put_file(self, path: str, data: bytes, timeout: float | None = None) -> None:
        from .files import put_file

        await put_file(self, path, data, timeout)

    async def get_file(self, path: str, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
        from .files import get_file

        return await get_file(self, path, timeout, max_bytes)

    async def put_dir(self, local_dir: str | Path, path: str, timeout: float | None = None) -> list[str]:
        from .files import put_dir

        return await put_dir(self, Path(local_dir), path, timeout)

    async def get_dir(
        self, path: str, local_dir: str | Path, timeout: float | None = None, max_bytes: int | None = None
    ) -> list[str]:
        from .files import get_dir

        return await get_dir(self, path, Path(local_dir), timeout, max_bytes)


class _HostStopped(Exception):
    """The kernel's host stopped while a kernel was expected to come up."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def _safe(callback: EventCallback) -> Emit:
    def emit(event: StreamEvent) -> None:
        try:
            callback(event)
        except Exception:
            log.exception("an on_event callback raised; the execution goes on")

    return emit


# Runs in the kernel: a subprocess whose stdout/stderr are relayed as they come (one thread, a
# selector, incremental UTF-8 decoding so multi-byte characters split across reads survive).
_RUN_COMMAND = """
def __cellforge_run(argv, cwd):
    import codecs, os, selectors, subprocess, sys
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relays = {{
        proc.stdout.fileno(): (sys.stdout, codecs.getincrementaldecoder("utf-8")("replace")),
        proc.stderr.fileno(): (sys.stderr, codecs.getincrementaldecoder("utf-8")("replace")),
    }}
    selector = selectors.DefaultSelector()
    for fd in relays:
        selector.register(fd, selectors.EVENT_READ)
    try:
        while selector.get_map():
            for key, _ in selector.select():
                stream, decoder = relays[key.fd]
                chunk = os.read(key.fd, 65536)
                stream.write(decoder.decode(chunk, final=not chunk))
                if not chunk:
                    selector.unregister(key.fd)
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        selector.close()
        proc.stdout.close()
        proc.stderr.close()
        sys.stdout.flush()
        sys.stderr.flush()
__cellforge_rc__ = __cellforge_run({argv}, {cwd})
del __cellforge_run
"""
