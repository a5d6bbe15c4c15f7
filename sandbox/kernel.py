"""`Sandbox`: one kernel in one sandbox, whatever the backend, and the outcome of each execution.

A backend provisions a `KernelHost` (backend.py); the `Sandbox` reaches its kernel through a relay
that bounds every message (relay.py) and a `KernelClient` (messaging.py), and turns what happens
into outcomes: ok, error, timeout (interrupted, state kept), killed (the interrupt was ignored: a
restarted kernel, state lost) and died (cause from the host). Files and commands are sub-objects
(`sandbox.files`, `sandbox.commands`) built on a small kernel API of the sandbox: `exclusive`,
`comm_request` and `run_code`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from .collector import Emit, ExecutionCollector
from .commands import Commands
from .errors import SandboxClosedError, SandboxDeadError, SandboxStartError
from .escapes import strip_escapes
from .events import ExecutionResult, Outcome, StatusEvent, StreamEvent
from .files import Files
from .messaging import CommReply, KernelClient, message_limit
from .relay import KernelRelay
from .spec import SandboxSpec

if TYPE_CHECKING:
    from .backend import KernelHost

log = logging.getLogger(__name__)

EventCallback = Callable[[StreamEvent], Any]
# One run: its result and the kernel's (untrusted) replies to the run's user expressions.
Replies = dict[str, Any]
_Runner = Callable[[Emit], Awaitable[tuple[ExecutionResult, Replies]]]

# How long a dead kernel's host may take to report its exit status before we give up asking.
EXIT_CAUSE_TIMEOUT_S = 10.0
# While waiting for a (re)started kernel, how often to ask whether its host stopped meanwhile.
HOST_CHECK_INTERVAL_S = 0.5
# How often the interrupt is sent again while an abandoned execution has not stopped.
ABANDONED_RETRY_S = 0.5

_DONE = object()


def unwatched(event: StreamEvent) -> None:
    """The `emit` of a run nobody watches: a backend seeing it may skip sending events as they happen."""


class Sandbox:
    """One kernel in one sandbox. Executions and file transfers run one at a time, in call order."""

    # Not offered by facades (SyncSandbox, PooledSandbox): the start-up step `SandboxBackend.create`
    # takes, and the kernel API of the sub-objects.
    INTERNAL: ClassVar[tuple[str, ...]] = ("start", "comm_request", "run_code")

    def __init__(self, spec: SandboxSpec, host: KernelHost, *, isolated: bool) -> None:
        self.id = host.sandbox_id
        self.spec = spec
        self.workspace = host.workspace
        self.data_root = host.data_root
        self.isolated = isolated
        self.files = Files(self)
        self.commands = Commands(self)
        self._host = host
        self._relay = KernelRelay(host.connection, message_limit(spec.output_limit))
        self._client = KernelClient(self._relay.info, spec.output_limit)
        self._lock = asyncio.Lock()
        self._closed = False
        self._dead: str | None = None
        # An execution its caller left (a stream left early, a cancelled call): interrupted then, and
        # followed until the kernel reports it done, so that the next request does not queue behind it.
        self._abandoned: tuple[str, ExecutionCollector] | None = None
        # In-kernel endpoints (comm target -> comm id), installed on first use in each new kernel.
        self._comms: dict[str, str] = {}

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

    async def stream(
        self, code: str, timeout: float | None = None
    ) -> AsyncGenerator[StreamEvent | ExecutionResult, None]:
        """Events as they happen, then the `ExecutionResult` as the last item.

        Leaving early (break, cancellation) interrupts the code; wrap in `contextlib.aclosing` to
        make that immediate rather than at garbage collection.
        """
        async for item in self._events(lambda emit: self._run(code, timeout, emit)):
            yield item[0] if isinstance(item, tuple) else item

    async def _with_events(self, run: _Runner, on_event: EventCallback | None) -> tuple[ExecutionResult, Replies]:
        if on_event is None:
            return await run(unwatched)
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
        """The events of one run as they happen, then its (result, replies)."""
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
    ) -> tuple[ExecutionResult, Replies]:
        """One run: its result and the replies to its expressions (what RaySandbox does through its actor)."""
        result, collector = await self._collect(code, timeout, emit, store_history, user_expressions)
        replies = (collector.reply or {}).get("user_expressions")
        return result, replies if isinstance(replies, dict) else {}

    async def _collect(
        self,
        code: str,
        timeout: float | None,
        emit: Emit,
        store_history: bool,
        user_expressions: dict[str, str] | None,
    ) -> tuple[ExecutionResult, ExecutionCollector]:
        timeout = self.spec.timeout if timeout is None else timeout
        self.check_usable()
        async with self._lock:
            self.check_usable()
            await self._settle_abandoned()
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
                    collector.emit = unwatched
                    self._abandoned = (msg_id, collector)
                raise
            finally:
                if self._abandoned is None or self._abandoned[0] != msg_id:
                    self._client.forget(msg_id)

    async def _settle_abandoned(self) -> None:
        """Wait up to `interrupt_grace` seconds for the abandoned execution to stop, sending the interrupt again
        every ABANDONED_RETRY_S: the one sent as its caller left was seen lost (1 CI run in 6), and the next
        request then queued behind the code until its own timeout. Code that ignores interrupts is left to
        that request's overrun handling (a kernel restart)."""
        if self._abandoned is None:
            return
        msg_id, collector = self._abandoned
        self._abandoned = None
        deadline = time.perf_counter() + self.spec.interrupt_grace
        try:
            while not (collector.done.is_set() or self._client.lost.is_set()):
                left = deadline - time.perf_counter()
                if left <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(ABANDONED_RETRY_S, left)):
                        await collector.done.wait()
                if not collector.done.is_set():
                    self._client.interrupt()
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
        self._comms.clear()
        if self._abandoned is not None:  # its kernel is going: nothing left to wait for
            self._client.forget(self._abandoned[0])
            self._abandoned = None
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

    # --- the kernel API of the sub-objects (files, commands) --------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self, timeout: float | None = None) -> AsyncIterator[None]:
        """Hold the kernel (after any running execution) for a few requests, within `timeout` seconds
        (default: the spec's) in all: TimeoutError past it; SandboxClosedError or SandboxDeadError
        when the sandbox is not usable."""
        self.check_usable()
        async with asyncio.timeout(self.spec.timeout if timeout is None else timeout):
            async with self._lock:
                self.check_usable()
                await self._settle_abandoned()
                yield

    async def comm_request(
        self, target: str, install: str, data: dict[str, Any], buffers: list[Any] | None = None
    ) -> CommReply:
        """One request to the in-kernel endpoint registered as comm `target` by the kernel code
        `install`, which runs once in each new kernel. Call it within `exclusive()`."""
        comm_id = self._comms.get(target)
        if comm_id is None:
            reply = await self._client.run_silently(install)
            if reply.get("status") != "ok":
                detail = reply.get("evalue", "kernel connection lost")
                raise SandboxStartError(f"sandbox {self.id}: could not set up {target} in the kernel: {detail}")
            comm_id = self._comms[target] = self._client.comm_open(target)
        return await self._client.comm_request(comm_id, data, buffers)

    async def run_code(
        self, code: str, expressions: dict[str, str], timeout: float | None, on_event: EventCallback | None
    ) -> tuple[ExecutionResult, dict[str, Any]]:
        """Run code of ours (not the user's: kept out of the history) as `execute` does; returns the
        result and the kernel's untrusted replies to `expressions`, evaluated after the code."""
        return await self._with_events(
            lambda emit: self._run(code, timeout, emit, store_history=False, user_expressions=expressions),
            on_event,
        )


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
