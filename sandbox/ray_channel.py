"""A direct execution channel between a Ray sandbox's caller and its actor: executions skip Ray's calls.

One Ray actor call per execution costs a few milliseconds more than the execution itself (Ray's own cost of a
call that suspends, and waking the actor's loop), which would make a Ray sandbox's round trip about twice a
Docker sandbox's. So the actor also listens on a TCP port of its node, in its own event loop, and the caller
sends executions there: a request (JSON: code, timeout, expressions, whether events are watched), then frames
of event batches and the `RunEnd`, exactly the items of the actor's `run` / `run_all` calls. The kernel's
sockets stay on the node; the channel carries only what those calls carry. Interrupts, restarts, files and the
sandbox's lifetime stay Ray calls, and Ray still tells the caller when the actor (its node) is lost.

Both ends prove themselves with a token of the actor's (`ChannelAddress`, handed out with the sandbox's facts
through Ray): the caller sends `client_token` first, and the node answers `server_token`, so neither end reads
a frame of a peer that does not hold them (a process that took over the port after the actor ended cannot
answer as the node). The node reads only JSON requests; the caller unpickles the node's frames, as Ray's calls
would. A caller that cannot reach the port (a Ray Client driver outside the cluster, a firewall) uses the Ray
calls instead (`RaySandbox`), so the channel is an optimisation, never a requirement.

A caller that leaves mid-run (cancelled, timed out) closes its connection; the node cancels the run and the
sandbox interrupts the code, as for a Ray call cancelled with `ray.cancel`. Connections are kept for reuse, one
per execution in flight.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import pickle
import random
import secrets
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import SandboxError, UsageError

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
PORTS_ENV = "CELLFORGE_RAY_CHANNEL_PORTS"
# A request is code and a few expressions; anything larger is not an honest caller's.
MAX_REQUEST = 64 << 20
# A frame from the node: a batch of events or a result (the sandbox caps outputs well below this).
MAX_FRAME = 1 << 30
HANDSHAKE_S = 10.0  # a peer that has not proven itself by then is dropped
CONNECT_S = 3.0  # a node port that does not answer by then is taken as unreachable (Ray calls are used)
_LENGTH = struct.Struct("!Q")

# What the node runs for a request: (code, timeout, expressions, watched) -> event batches, then the RunEnd.
RunItems = Callable[[str, "float | None", "dict[str, str] | None", bool], AsyncIterator[Any]]


@dataclass(frozen=True)
class ChannelAddress:
    host: str
    port: int
    client_token: bytes = field(repr=False)
    server_token: bytes = field(repr=False)


class ChannelUnreachable(SandboxError):
    """The node's port could not be reached or did not prove itself: nothing was sent (the caller uses Ray
    calls instead; it never reaches a user)."""


def configured_ports(value: str | None = None) -> range | None | Literal["off"]:
    """The port range the node's channels listen on: `$CELLFORGE_RAY_CHANNEL_PORTS` ("40000-40999", both ends
    included), so a firewall between API replicas and sandbox nodes can open just those; None (unset): any free
    port; "off": no channel (where no port can be opened to the replicas, executions are Ray calls from the
    start instead of after a connect timeout per sandbox). UsageError naming the variable for anything else."""
    value = os.environ.get(PORTS_ENV, "") if value is None else value
    text = value.strip()
    if not text:
        return None
    if text.lower() == "off":
        return "off"
    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        first, last = 0, -1
    if not 1 <= first <= last <= 65535:
        raise UsageError(f"${PORTS_ENV}={value!r}: expected a port range FIRST-LAST within 1-65535, e.g. "
                         "40000-40999, or 'off'")
    return range(first, last + 1)


def _frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > limit:
        raise ConnectionError(f"a frame of {size} bytes (at most {limit})")
    return await reader.readexactly(size)


def _parse_request(payload: bytes) -> tuple[str, float | None, dict[str, str] | None, bool]:
    """The request's fields, checked; ValueError for anything else."""
    request = json.loads(payload)
    code, timeout = request["code"], request["timeout"]
    expressions, watched = request["expressions"], request["watched"]
    if not isinstance(code, str) or not isinstance(watched, bool):
        raise ValueError("code must be a string and watched a boolean")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
        raise ValueError("timeout must be a number or null")
    if expressions is not None and not (
        isinstance(expressions, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in expressions.items())
    ):
        raise ValueError("expressions must map names to code")
    return code, timeout, expressions, watched


def _pickled_error(exc: BaseException) -> bytes:
    try:
        return pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - an exception that does not pickle still reaches the caller as text
        return pickle.dumps(SandboxError(f"{type(exc).__name__}: {exc}"))


class ChannelServer:
    """The node's end, in the actor's event loop: runs each authenticated request through `run_items`."""

    def __init__(self, run_items: RunItems) -> None:
        self._run_items = run_items
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def open(self, host: str, ports: range | None = None) -> ChannelAddress:
        """Listen on `host`, on a free port of `ports` (tried in random order), or any free port when None;
        OSError when every port of the range is taken."""
        self._client_token, self._server_token = secrets.token_bytes(TOKEN_BYTES), secrets.token_bytes(TOKEN_BYTES)
        if ports is None:
            self._server = await asyncio.start_server(self._serve, host=host, port=0)
        else:
            for port in random.sample(ports, len(ports)):
                try:
                    self._server = await asyncio.start_server(self._serve, host=host, port=port)
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
            else:
                raise OSError(errno.EADDRINUSE, f"every port of {ports.start}-{ports.stop - 1} is taken on {host}")
        port = self._server.sockets[0].getsockname()[1]
        return ChannelAddress(host, port, self._client_token, self._server_token)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            async with asyncio.timeout(HANDSHAKE_S):
                token = await reader.readexactly(TOKEN_BYTES)
            if not secrets.compare_digest(token, self._client_token):
                return
            writer.write(self._server_token)
            while True:
                try:
                    request = _parse_request(await _read_frame(reader, MAX_REQUEST))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("execution channel: a malformed request (%s); connection closed", exc)
                    return
                if not await self._one(reader, writer, *request):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, asyncio.CancelledError):
            return  # the caller left; a run it left was cancelled in _one
        finally:
            self._connections.discard(task)
            writer.close()

    async def _one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        code: str, timeout: float | None, expressions: dict[str, str] | None, watched: bool,
    ) -> bool:
        """Run one request, its frames written as they come; False when the caller left meanwhile (the run was
        cancelled: the sandbox interrupts the code)."""
        # A caller sends nothing while its run is going: a read that ends means it left.
        left = asyncio.ensure_future(reader.read(1))
        produce = asyncio.ensure_future(self._produce(writer, code, timeout, expressions, watched))
        try:
            await asyncio.wait({left, produce}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            produce.cancel()
            left.cancel()
            raise
        if not produce.done():
            produce.cancel()
            left.cancel()
            await asyncio.wait({produce})
            return False
        # The last frame goes only after the watch for leaving stopped, so the next request's bytes stay unread.
        left.cancel()
        await asyncio.wait({left})
        if not left.cancelled():
            return False  # the caller sent bytes mid-run, or left just as the run ended
        writer.write(_frame(produce.result()))
        await writer.drain()
        return True

    async def _produce(
        self, writer: asyncio.StreamWriter, code: str, timeout: float | None,
        expressions: dict[str, str] | None, watched: bool,
    ) -> bytes:
        """Write the run's event batches as they come; the payload of the last frame (its RunEnd or its error)."""
        try:
            async for item in self._run_items(code, timeout, expressions, watched):
                if not isinstance(item, list):
                    return pickle.dumps(item)  # the RunEnd
                writer.write(_frame(pickle.dumps(item)))
                await writer.drain()
        except Exception as exc:  # noqa: BLE001 - the sandbox layer's errors cross as themselves
            return _pickled_error(exc)
        return _pickled_error(RuntimeError("the run ended without a result"))


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def abort(self) -> None:
        self.writer.transport.abort()


class ChannelClient:
    """The caller's end: executions over pooled connections to one actor's channel."""

    def __init__(self, address: ChannelAddress) -> None:
        self.address = address
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        address = self.address
        try:
            async with asyncio.timeout(CONNECT_S):
                reader, writer = await asyncio.open_connection(address.host, address.port)
                writer.write(address.client_token)
                answer = await reader.readexactly(TOKEN_BYTES)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise ChannelUnreachable(f"{address.host}:{address.port}: {exc or type(exc).__name__}") from None
        if not secrets.compare_digest(answer, address.server_token):
            writer.transport.abort()
            raise ChannelUnreachable(f"{address.host}:{address.port} did not answer as the sandbox's node")
        return _Connection(reader, writer)

    async def connection(self) -> _Connection:
        """An idle connection, or a new one (ChannelUnreachable when there can be none)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.abort()
        return await self._connect()

    @staticmethod
    def request(code: str, timeout: float | None, expressions: dict[str, str] | None, watched: bool) -> bytes | None:
        """A run's request; None when it is larger than a node takes over the channel (a Ray call carries it)."""
        payload = json.dumps({"code": code, "timeout": timeout, "expressions": expressions, "watched": watched})
        return payload.encode() if len(payload) <= MAX_REQUEST else None

    async def run(self, conn: _Connection, request: bytes, on_batch: Callable[[list[Any]], None] | None) -> Any:
        """The run's last item (its RunEnd), its batches given to `on_batch` as they come (None: the request is
        not watched). An error of the sandbox layer is raised as itself; a connection that broke raises
        ConnectionError (IncompleteReadError). The connection is kept for reuse only after a whole exchange."""
        try:
            conn.writer.write(_frame(request))
            while True:
                item = pickle.loads(await _read_frame(conn.reader, MAX_FRAME))
                if not isinstance(item, list):
                    break
                if on_batch is not None:
                    on_batch(item)
        except BaseException:
            conn.abort()  # the node sees the caller leave and cancels the run
            raise
        self._idle.append(conn)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
