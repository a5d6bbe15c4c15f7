"""A sandbox on a CellForge server, shaped like the E2B SDK's:

    with Sandbox(memory="1g") as sb:                    # CELLFORGE_URL, CELLFORGE_API_KEY from the environment
        execution = sb.run_code("print('fit')\\nsum(range(3))", on_stdout=print)
        execution.text                                  # '3' (the last expression's value)
        sb.files.write("data/x.csv", "a,b\\n1,2\\n"); sb.files.read("data/x.csv"); sb.files.list("data")
        sb.commands.run("python --version").stdout      # no shell: the line is split, not interpreted

    async with await AsyncSandbox.create() as sb:       # the same, awaited; callbacks may be coroutines
        await sb.run_code("print(1)", on_stdout=print)

Over HTTP (default) or gRPC (`transport="grpc"`, the URL then `host:port`). Leaving the `with` block
deletes the sandbox, as E2B's kill does; `Sandbox.connect(id)` attaches to one that exists.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from sandbox.events import DisplayEvent, ErrorEvent, ExecutionResult, ResultEvent, StderrEvent, StdoutEvent, StreamEvent

from . import CellForgeClient

Transport = Literal["http", "grpc"]
OutputHandler = Callable[[str], Any]


class Result(BaseModel):
    """One rich output: the value of the last expression (`is_main_result`) or a displayed object."""

    data: dict[str, Any] = Field(description="MIME type -> content (binary types such as image/png in base64)")
    is_main_result: bool = False

    @property
    def text(self) -> str | None:
        return self.data.get("text/plain")

    @property
    def html(self) -> str | None:
        return self.data.get("text/html")

    @property
    def png(self) -> str | None:
        return self.data.get("image/png")

    def formats(self) -> list[str]:
        return sorted(self.data)


class Logs(BaseModel):
    stdout: list[str] = Field(default_factory=list)
    stderr: list[str] = Field(default_factory=list)


class ExecutionError(BaseModel):
    name: str
    value: str
    traceback: str = ""


class Execution(BaseModel):
    """How `run_code` went: rich outputs, printed text, the error if any, and the sandbox's outcome
    (ok | error | timeout | killed | died: a timeout keeps the kernel's state, killed and died lose it)."""

    results: list[Result] = Field(default_factory=list)
    logs: Logs = Field(default_factory=Logs)
    error: ExecutionError | None = None
    outcome: str = "ok"
    duration_ms: float = 0.0

    @property
    def text(self) -> str | None:
        return next((r.text for r in self.results if r.is_main_result), None)


class CommandResult(BaseModel):
    stdout: str
    stderr: str
    exit_code: int | None = Field(description="None when the command did not end by itself (timeout, killed)")
    error: str | None = None


class EntryInfo(BaseModel):
    name: str
    path: str = Field(description="relative to the workspace")


def execution_of(events: Sequence[StreamEvent], result: ExecutionResult) -> Execution:
    """The typed execution from the streamed events and the final result."""
    execution = Execution(outcome=result.outcome.value, duration_ms=result.duration_ms)
    for event in events:
        if isinstance(event, StdoutEvent):
            execution.logs.stdout.append(event.text)
        elif isinstance(event, StderrEvent):
            execution.logs.stderr.append(event.text)
        elif isinstance(event, ResultEvent | DisplayEvent):
            execution.results.append(Result(data=event.data, is_main_result=isinstance(event, ResultEvent)))
        elif isinstance(event, ErrorEvent):
            execution.error = ExecutionError(name=event.ename, value=event.evalue, traceback="\n".join(event.traceback))
    if execution.error is None and not result.ok:  # a timeout, a kill or a death raises nothing in the kernel
        execution.error = ExecutionError(name=result.ename or result.outcome.value,
                                         value=result.evalue or result.died_cause or result.outcome.value,
                                         traceback="\n".join(result.traceback))
    return execution


def _dispatch(event: StreamEvent, on_stdout: OutputHandler | None, on_stderr: OutputHandler | None,
              on_result: Callable[[Result], Any] | None, on_error: Callable[[ExecutionError], Any] | None) -> Any:
    """Call the handler the event is for; returns what it returned (a coroutine, for async handlers)."""
    if isinstance(event, StdoutEvent) and on_stdout:
        return on_stdout(event.text)
    if isinstance(event, StderrEvent) and on_stderr:
        return on_stderr(event.text)
    if isinstance(event, ResultEvent | DisplayEvent) and on_result:
        return on_result(Result(data=event.data, is_main_result=isinstance(event, ResultEvent)))
    if isinstance(event, ErrorEvent) and on_error:
        return on_error(ExecutionError(name=event.ename, value=event.evalue, traceback="\n".join(event.traceback)))
    return None


def _argv(cmd: str | Sequence[str]) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


class Files:
    """The sandbox's workspace files (paths relative to it)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def write(self, path: str, data: str | bytes) -> EntryInfo:
        self._sb.client.put_file(self._sb.sandbox_id, path, data.encode() if isinstance(data, str) else data)
        return EntryInfo(name=path.rsplit("/", 1)[-1], path=path)

    def read(self, path: str, format: Literal["text", "bytes"] = "text") -> Any:  # noqa: A002 - E2B's name
        data = self._sb.client.get_file(self._sb.sandbox_id, path)
        return data.decode() if format == "text" else data

    def list(self, path: str = "") -> list[EntryInfo]:
        """Regular files under the folder `path`, recursively."""
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        return [EntryInfo(name=name.rsplit("/", 1)[-1], path=prefix + name)
                for name in self._sb.client.list_files(self._sb.sandbox_id, path)]


class Commands:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def run(self, cmd: str | Sequence[str], cwd: str | None = None, timeout: float | None = None) -> CommandResult:
        """Run a program and wait for it; a string is split like a shell line but never run by a shell."""
        result = self._sb.client.run_command(self._sb.sandbox_id, _argv(cmd), cwd, timeout)
        error = None if result.exit_code == 0 else (result.evalue or result.died_cause or result.outcome.value)
        return CommandResult(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code, error=error)


class Sandbox:
    """A sandbox on a CellForge server (see the module's docstring)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, transport: Transport = "http",
                 sandbox_id: str | None = None, request_timeout: float = 120.0, **spec: Any) -> None:
        """A new sandbox (`spec`: image, cpus, memory, gpus, timeout, workspace_quota, env, dataset_id), or
        the existing `sandbox_id`. `url` and `api_key` default to CELLFORGE_URL and CELLFORGE_API_KEY."""
        url = url or os.environ.get("CELLFORGE_URL") or "http://127.0.0.1:8000"
        api_key = api_key or os.environ.get("CELLFORGE_API_KEY")
        if not api_key:
            raise ValueError("api_key: pass one or set CELLFORGE_API_KEY")
        self.client = CellForgeClient(url, api_key, transport=transport, timeout=request_timeout)
        try:
            info = self.client.get_sandbox(sandbox_id) if sandbox_id else self.client.create_sandbox(**spec)
        except BaseException:
            self.client.close()
            raise
        self.sandbox_id = info.id
        self.info = info
        self.files = Files(self)
        self.commands = Commands(self)

    @classmethod
    def connect(cls, sandbox_id: str, url: str | None = None, api_key: str | None = None, **kwargs: Any) -> Sandbox:
        return cls(url, api_key, sandbox_id=sandbox_id, **kwargs)

    def run_code(self, code: str, *, on_stdout: OutputHandler | None = None, on_stderr: OutputHandler | None = None,
                 on_result: Callable[[Result], Any] | None = None,
                 on_error: Callable[[ExecutionError], Any] | None = None, timeout: float | None = None) -> Execution:
        """Run `code` in the sandbox's kernel (state is kept between calls); handlers get output as it comes."""
        events: list[StreamEvent] = []

        def seen(event: StreamEvent) -> None:
            events.append(event)
            _dispatch(event, on_stdout, on_stderr, on_result, on_error)

        result = self.client.execute(self.sandbox_id, code, timeout, on_event=seen)
        return execution_of(events, result)

    def interrupt(self) -> None:
        self.client.interrupt(self.sandbox_id)

    def restart(self) -> None:
        """A fresh kernel: variables are lost, files stay."""
        self.client.restart(self.sandbox_id)

    def is_running(self) -> bool:
        return self.client.get_sandbox(self.sandbox_id).status == "live"

    def kill(self) -> None:
        """Delete the sandbox on the server and close the connection."""
        try:
            self.client.delete_sandbox(self.sandbox_id)
        finally:
            self.client.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class AsyncFiles:
    def __init__(self, files: Files) -> None:
        self._files = files

    async def write(self, path: str, data: str | bytes) -> EntryInfo:
        return await asyncio.to_thread(self._files.write, path, data)

    async def read(self, path: str, format: Literal["text", "bytes"] = "text") -> Any:  # noqa: A002
        return await asyncio.to_thread(self._files.read, path, format)

    async def list(self, path: str = "") -> list[EntryInfo]:
        return await asyncio.to_thread(self._files.list, path)


class AsyncCommands:
    def __init__(self, commands: Commands) -> None:
        self._commands = commands

    async def run(self, cmd: str | Sequence[str], cwd: str | None = None, timeout: float | None = None) -> CommandResult:
        return await asyncio.to_thread(self._commands.run, cmd, cwd, timeout)


class AsyncSandbox:
    """`Sandbox`, awaited: the blocking client runs in a worker thread; handlers (plain functions or
    coroutines) run on the caller's event loop, in the order the output came."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox
        self.sandbox_id = sandbox.sandbox_id
        self.info = sandbox.info
        self.files = AsyncFiles(sandbox.files)
        self.commands = AsyncCommands(sandbox.commands)

    @classmethod
    async def create(cls, url: str | None = None, api_key: str | None = None, **kwargs: Any) -> AsyncSandbox:
        return cls(await asyncio.to_thread(Sandbox, url, api_key, **kwargs))

    @classmethod
    async def connect(cls, sandbox_id: str, url: str | None = None, api_key: str | None = None,
                      **kwargs: Any) -> AsyncSandbox:
        return cls(await asyncio.to_thread(Sandbox.connect, sandbox_id, url, api_key, **kwargs))

    async def run_code(self, code: str, *, on_stdout: Callable[[str], Any] | None = None,
                       on_stderr: Callable[[str], Any] | None = None, on_result: Callable[[Result], Any] | None = None,
                       on_error: Callable[[ExecutionError], Any] | None = None,
                       timeout: float | None = None) -> Execution:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent | None] = asyncio.Queue()

        def run() -> ExecutionResult:
            def seen(event: StreamEvent) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, event)

            try:
                result = self._sb.client.execute(self.sandbox_id, code, timeout, on_event=seen)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)
            return result

        worker = asyncio.ensure_future(asyncio.to_thread(run))
        events: list[StreamEvent] = []
        while (event := await queue.get()) is not None:
            events.append(event)
            outcome = _dispatch(event, on_stdout, on_stderr, on_result, on_error)
            if isinstance(outcome, Awaitable):
                await outcome
        return execution_of(events, await worker)

    async def interrupt(self) -> None:
        await asyncio.to_thread(self._sb.interrupt)

    async def restart(self) -> None:
        await asyncio.to_thread(self._sb.restart)

    async def is_running(self) -> bool:
        return await asyncio.to_thread(self._sb.is_running)

    async def kill(self) -> None:
        await asyncio.to_thread(self._sb.kill)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()
