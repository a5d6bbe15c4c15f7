"""Jupyter messaging with one kernel: `KernelClient` and the listeners it routes messages to.

`KernelClient` owns the ZMQ sockets of one kernel connection (a `jupyter_client` Session signs and
parses the messages) with one reader task per channel that routes every message to the request that
caused it, by parent `msg_id`. Nothing polls on the hot path: a request registers a listener, the
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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

ConnectionInfo = dict[str, Any]  # the contents of a Jupyter connection file

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


@dataclass
class CommReply:
    """The kernel's answer on a comm channel (untrusted: `data` is whatever it sent)."""

    data: Any = None
    buffers: list[bytes] = field(default_factory=list)
    oversize: int | None = None  # the size of a reply over the output limit (data is then None)
    lost: bool = False  # the connection dropped before an answer came


class _CommWaiter(Listener):
    def __init__(self) -> None:
        self.reply: CommReply | None = None
        self.done = asyncio.Event()

    def on_iopub(self, msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "comm_msg":
            if "oversize" in msg:
                self.reply = CommReply(oversize=msg["oversize"])
            else:
                buffers = [bytes(b) for b in msg.get("buffers") or []]
                self.reply = CommReply(data=msg["content"].get("data"), buffers=buffers)
            self.done.set()

    def on_lost(self) -> None:
        self.done.set()

    def on_iopub_gap(self) -> None:
        # The reply travels on iopub: it may be lost with the connection.
        self.on_lost()


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
                    reply = waiter.reply
                    if reply is not None and self._answered(waiter, previous_session):
                        session = reply["header"]["session"]
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(interval):
                                while self._iopub_session != session:
                                    self._iopub_seen.clear()
                                    await self._iopub_seen.wait()
                        if self._iopub_session == session:
                            self.session_id = session
                            self.kernel_info = reply["content"]
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

    async def run_silently(self, code: str) -> dict[str, Any]:
        """Run code of ours (silent, out of history) and return the content of its reply ({} if lost)."""
        waiter = ReplyWaiter()
        msg_id = self.execute(code, waiter, silent=True, store_history=False)
        try:
            await waiter.done.wait()
        finally:
            self.forget(msg_id)
        return waiter.reply["content"] if waiter.reply else {}

    def comm_open(self, target: str) -> str:
        """Open a comm to `target` (registered in the kernel beforehand); returns the comm id."""
        comm_id = uuid.uuid4().hex
        self._send(self._sockets["shell"], "comm_open", {"comm_id": comm_id, "target_name": target, "data": {}})
        return comm_id

    async def comm_request(self, comm_id: str, data: dict[str, Any], buffers: list[Any] | None = None) -> CommReply:
        """Send `data` (and raw `buffers`) on a comm and wait for the kernel's next message on it."""
        await self.iopub_ready()
        waiter = _CommWaiter()
        msg_id = self._send(self._sockets["shell"], "comm_msg", {"comm_id": comm_id, "data": data}, waiter, buffers)
        try:
            await waiter.done.wait()
        finally:
            self.forget(msg_id)
        return waiter.reply or CommReply(lost=True)

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

