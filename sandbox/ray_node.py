"""What runs on a Ray node for the Ray backend: one actor per sandbox, owning its hardened container.

The actor creates the sandbox with this node's Docker backend, so the container, its kernel's
sockets and its socket folder never leave the node; the caller (ray_backend.RaySandbox) reaches the
kernel only through the actor's methods. Executions stream back as a Ray streaming generator:
batches of events as they happen (what comes within `FLUSH_S` of a batch's first event travels with it),
then one `RunEnd` carrying the last batch; a caller that does not watch events as they happen makes one
plain call (`run_all`). Errors of the sandbox layer cross as themselves (the caller re-raises Ray's
wrapped cause). The same items also travel over the actor's execution channel (ray_channel), a direct
connection the caller uses when it can reach the node, which saves Ray's cost of a call per execution.

An actor can be made before its sandbox is asked for (a *spare*, see ray_backend): it holds its resources
and its worker process, and ends itself unless `start()` comes within `spare_ttl` seconds.

Loaded on the node by Ray (the class is pickled by reference), so every sandbox node needs
CellForge installed in the Python environment its Ray workers run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from .docker_backend import DockerBackend
from .errors import SandboxClosedError
from .events import ExecutionResult, StreamEvent
from .files import regular_files, workspace_path
from .kernel import Replies, Sandbox
from .ray_channel import ChannelAddress, ChannelServer, configured_ports
from .spec import SandboxSpec

log = logging.getLogger(__name__)

# The calls a sandbox takes many of per second (executions, file transfers, the idle probe) record no Ray task
# events: the cluster's task-event store is bounded, so thousands of them would push out the records of the
# jobs and actors an operator looks for (`ray list tasks`, the dashboard).
_quiet = ray.method(enable_task_events=False)

# Seconds a batch of events waits for more (or for the end of the run) before it travels: a quick run is one
# Ray object, and output reaches a watcher at most this much later.
FLUSH_S = 0.02


@dataclass(frozen=True)
class NodeSandbox:
    """What the caller learns of a started sandbox."""

    container: str  # the Docker backend's sandbox id on that node (its container is cellforge-<container>)
    workspace: str
    data_root: str
    node_id: str  # the Ray node
    hostname: str
    channel: ChannelAddress | None = None  # the actor's execution channel (None: executions are Ray calls)


@dataclass(frozen=True)
class RunEnd:
    """The last item of an execution's stream: its result, the replies to its expressions, and whether
    the kernel is dead afterwards (and why)."""

    result: ExecutionResult
    replies: Replies
    dead: str | None
    events: list[StreamEvent]  # those not yet sent, in order before the result


class SandboxActor:
    """One sandbox on this node (an async Ray actor: calls run concurrently on its event loop, so an
    interrupt is never queued behind the execution it stops)."""

    def __init__(self, spare_ttl: float | None = None) -> None:
        self._backend = DockerBackend()
        self._sandbox: Sandbox | None = None
        self._facts: tuple[SandboxSpec, NodeSandbox] | None = None
        self._closed = asyncio.Event()
        self._active = time.monotonic()  # the last call's end: processes sharing the sandbox ask for it
        self._calls = 0
        self._started = False
        self._channel = ChannelServer(self._run_items)
        if spare_ttl:
            # A spare ends itself if no sandbox is started in it in time, whether or not the process that made it
            # is still there to close it (a detached spare outlives an API replica that stopped).
            me = ray.get_runtime_context().current_actor
            timer = threading.Timer(spare_ttl, lambda: None if self._started else ray.kill(me, no_restart=True))
            timer.daemon = True
            timer.start()

    async def start(self, spec: SandboxSpec) -> NodeSandbox:
        self._started = True
        ports = configured_ports()  # a node misconfigured fails its starts, before any container is made
        if spec.gpus:
            # The devices Ray reserved for this actor, whatever the spec named: ids are per node.
            spec = spec.model_copy(update={"gpus": [str(g) for g in ray.get_runtime_context().get_accelerator_ids()["GPU"]]})
        self._sandbox = sb = await self._backend.create(spec)
        channel: ChannelAddress | None = None
        if ports != "off":
            try:
                channel = await self._channel.open(ray.util.get_node_ip_address(), ports)
            except OSError as exc:
                log.warning("sandbox %s: no execution channel (%s); its executions are Ray calls", sb.id, exc)
        facts = NodeSandbox(sb.id, sb.workspace, sb.data_root, ray.get_runtime_context().get_node_id(),
                            socket.gethostname(), channel)
        self._facts = (spec, facts)
        return facts

    def _touch(self) -> None:
        self._active = time.monotonic()

    @_quiet
    async def idle_seconds(self) -> float:
        """Seconds since the sandbox was last used through any process (0 while an execution runs)."""
        return 0.0 if self._calls else time.monotonic() - self._active

    async def describe(self) -> tuple[SandboxSpec, NodeSandbox]:
        """The spec and facts of the started sandbox, for a process attaching to it by name."""
        if self._facts is None or self._closed.is_set():
            raise SandboxClosedError("this sandbox is closed (or was never started)")
        return self._facts

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            raise RuntimeError("SandboxActor.start() must run first")
        return self._sandbox

    def _work(
        self, code: str, timeout: float | None, expressions: dict[str, str] | None, on_event: Any
    ) -> Awaitable[tuple[ExecutionResult, Replies]]:
        if expressions is None:
            return _no_replies(self.sandbox.execute(code, timeout, on_event=on_event))
        return self.sandbox.run_code(code, expressions, timeout, on_event)

    @_quiet
    async def run(
        self, code: str, timeout: float | None, expressions: dict[str, str] | None
    ) -> AsyncIterator[list[StreamEvent] | RunEnd]:
        """`_stream` as a Ray streaming call."""
        async for item in self._stream(code, timeout, expressions):
            yield item

    @_quiet
    async def run_all(self, code: str, timeout: float | None, expressions: dict[str, str] | None) -> RunEnd:
        """`_all` as one plain Ray call. Cancelled (ray.cancel): the sandbox interrupts the code."""
        return await self._all(code, timeout, expressions)

    async def _stream(
        self, code: str, timeout: float | None, expressions: dict[str, str] | None
    ) -> AsyncIterator[list[StreamEvent] | RunEnd]:
        """Run code (with `expressions`: code of ours, out of the history, as `Sandbox.run_code`),
        yielding its events in batches as they come, then the `RunEnd`. Cancelled (the caller left):
        the sandbox interrupts the code, as it does for a local caller."""
        sb = self.sandbox
        self._calls += 1
        pending: list[StreamEvent] = []
        arrived = asyncio.Event()  # events are pending, or the run ended
        ended = asyncio.Event()

        def on_event(event: StreamEvent) -> None:
            pending.append(event)
            arrived.set()

        def on_end(_: object) -> None:  # after every event of the run
            ended.set()
            arrived.set()

        task = asyncio.ensure_future(self._work(code, timeout, expressions, on_event))
        task.add_done_callback(on_end)
        try:
            while True:
                await arrived.wait()
                if not ended.is_set():
                    # Whatever else comes in a moment travels in the same batch (one Ray object, not one each).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(FLUSH_S):
                            await ended.wait()
                arrived.clear()
                batch, pending[:] = pending[:], []
                if ended.is_set():
                    break
                yield batch
            if task.exception() is not None and batch:
                yield batch  # the events before the failure, then the failure (as a local run has them)
            result, replies = task.result()
            yield RunEnd(result, replies, sb.dead, batch)
        finally:
            self._calls -= 1
            self._touch()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _all(self, code: str, timeout: float | None, expressions: dict[str, str] | None) -> RunEnd:
        """`_stream` for a caller that does not watch events as they happen: the `RunEnd` carries them all."""
        sb = self.sandbox
        self._calls += 1
        events: list[StreamEvent] = []
        try:
            result, replies = await self._work(code, timeout, expressions, events.append)
            return RunEnd(result, replies, sb.dead, events)
        finally:
            self._calls -= 1
            self._touch()

    async def _run_items(
        self, code: str, timeout: float | None, expressions: dict[str, str] | None, watched: bool
    ) -> AsyncIterator[list[StreamEvent] | RunEnd]:
        """What the execution channel sends for a request: the items of `run`, or of `run_all` when unwatched."""
        if watched:
            async for item in self._stream(code, timeout, expressions):
                yield item
        else:
            yield await self._all(code, timeout, expressions)

    async def interrupt(self) -> None:
        self._touch()
        await self.sandbox.interrupt()

    async def restart(self) -> None:
        self._touch()
        await self.sandbox.restart()

    # --- files: one call per transfer; folders are staged in a private folder on this node ---------------

    @_quiet
    async def put_file(self, path: str, data: bytes, timeout: float | None) -> None:
        self._touch()
        await self.sandbox.files.put(path, data, timeout)

    @_quiet
    async def get_file(self, path: str, timeout: float | None, max_bytes: int | None) -> bytes:
        self._touch()
        return await self.sandbox.files.get(path, timeout, max_bytes)

    @_quiet
    async def list_files(self, path: str, timeout: float | None) -> list[str]:
        self._touch()
        return await self.sandbox.files.list(path, timeout)

    @_quiet
    async def remove_file(self, path: str, timeout: float | None) -> None:
        self._touch()
        await self.sandbox.files.remove(path, timeout)

    @_quiet
    async def put_dir(self, files: dict[str, bytes], path: str, timeout: float | None) -> list[str]:
        self._touch()
        with _staging() as folder:
            for inner, data in files.items():
                target = folder / workspace_path(inner)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            return await self.sandbox.files.put_dir(folder, path, timeout)

    @_quiet
    async def get_dir(self, path: str, timeout: float | None, max_bytes: int | None) -> dict[str, bytes]:
        self._touch()
        with _staging() as folder:
            await self.sandbox.files.get_dir(path, folder, timeout, max_bytes)
            return {inner: source.read_bytes() for inner, source in regular_files(folder)}

    # --- lifetime ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Remove the container and everything of the sandbox on this node; idempotent."""
        await self._channel.close()
        if self._sandbox is not None:
            await self._sandbox.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        """Returns once the sandbox is closed: the caller keeps one such call pending, so the loss of
        this actor (its node died) is known at once, not at the next call."""
        await self._closed.wait()


async def _no_replies(execution: Awaitable[ExecutionResult]) -> tuple[ExecutionResult, Replies]:
    return await execution, {}


@contextlib.contextmanager
def _staging() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="cellforge-ray-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
