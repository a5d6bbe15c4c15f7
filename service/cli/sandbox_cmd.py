"""`cellforge sandbox run|bench`: run a script in a fresh sandbox; measure the sandbox layer."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sandbox.backend import BackendKind, new_backend
from sandbox.bench import run_bench
from sandbox.docker_backend import DockerBackend
from sandbox.errors import SandboxError, SpecError
from sandbox.escapes import strip_escapes
from sandbox.events import (
    DisplayEvent,
    ErrorEvent,
    ExecutionResult,
    StatusEvent,
    StderrEvent,
    StdoutEvent,
    TruncatedEvent,
)
from sandbox.spec import DEFAULT_CPU_IMAGE
from sandbox.pool import DEFAULT_PRELOAD
from sandbox.spec import SandboxSpec

sandbox_app = typer.Typer(help="Run code in a sandbox and measure the sandbox layer.", no_args_is_help=True)
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole (paths, for grep and logs)

# Exit status of `sandbox run` per outcome; only `ok` is 0. 124 follows coreutils `timeout`,
# 137 (128 + SIGKILL) is what a shell reports for a process the kernel's OOM killer ended.
EXIT_CODES = {"ok": 0, "error": 1, "timeout": 124, "killed": 125, "died": 137}
EXIT_BAD_INPUT = 2
EXIT_START_FAILED = 3
RUNTIME_HELP = "Container runtime of the docker sandbox: runsc (gVisor) or runc; default: the engine's (runc)."


def _safe(text: Any) -> str:
    """Sandbox-made text for a rich line: no terminal escapes, no rich markup (e.g. [link=...])."""
    return escape(strip_escapes(str(text)))


class _LiveOutput:
    """Writes a running execution's output to the terminal as it arrives, without the terminal
    escapes sandboxed code put in it (clipboard, title, hyperlinks: see sandbox.escapes)."""

    def __init__(self) -> None:
        self.ends_with_newline = True

    def __call__(self, event: Any) -> None:
        if isinstance(event, StdoutEvent):
            self._out(event.text)
        elif isinstance(event, StderrEvent):
            sys.stderr.write(strip_escapes(event.text))
            sys.stderr.flush()
        elif isinstance(event, DisplayEvent) and "text/plain" in event.data:
            self._out(str(event.data["text/plain"]) + "\n")
        elif isinstance(event, ErrorEvent):
            lines = event.traceback or [f"{event.ename}: {event.evalue}"]
            sys.stderr.write(strip_escapes("\n".join(lines)) + "\n")
            sys.stderr.flush()
        elif isinstance(event, TruncatedEvent):
            err.print(f"[yellow]output passed {event.limit_bytes} bytes; the rest is dropped[/]")
        elif isinstance(event, StatusEvent):
            err.print(f"[yellow]kernel {_safe(event.state)}[/] {_safe(event.detail)}".rstrip())

    def _out(self, text: str) -> None:
        text = strip_escapes(text)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.ends_with_newline = text.endswith("\n")


async def _run_file(
    code: str, spec: SandboxSpec, backend: BackendKind, timeout: float, live: _LiveOutput
) -> tuple[Any, ExecutionResult]:
    with err.status(f"starting a {backend.value} sandbox ({spec.image})", spinner="dots"):
        try:
            sb = await new_backend(backend).create(spec)
        except SandboxError as exc:
            err.print(f"[red]could not start the sandbox:[/] {_safe(exc)}")
            raise typer.Exit(EXIT_START_FAILED) from None
    try:
        return sb, await sb.execute(code, timeout=timeout, on_event=live)
    finally:
        await sb.close()


def _run_remote(server: str, api_key: str | None, code: str, spec: SandboxSpec,
                live: _LiveOutput) -> tuple[str, ExecutionResult]:
    from service.client import APIError
    from service.client.remote import run_script

    if not api_key:
        err.print("[red]--server needs --api-key (or CELLFORGE_API_KEY)[/]")
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        return run_script(server, api_key, code, on_event=live, image=spec.image, cpus=spec.cpus,
                          memory=spec.memory, gpus=spec.gpus, timeout=spec.timeout)
    except APIError as exc:
        err.print(f"[red]the server refused the run:[/] {_safe(exc)}")
        raise typer.Exit(EXIT_START_FAILED) from None


def _summary(res: ExecutionResult, sandbox_id: str, backend: str, isolated: bool) -> dict[str, Any]:
    return {
        "outcome": res.outcome.value,
        "ename": res.ename,
        "evalue": res.evalue,
        "died_cause": res.died_cause,
        "duration_ms": round(res.duration_ms, 2),
        "stdout_bytes": res.stdout_bytes,
        "truncated": res.truncated,
        "state_lost": res.state_lost,
        "sandbox_id": sandbox_id,
        "backend": backend,
        "isolated": isolated,
    }


@sandbox_app.command("run")
def run(
    file: Annotated[Path, typer.Argument(help="Python file to run in the sandbox's kernel.")],
    backend: Annotated[BackendKind, typer.Option(help="docker (isolated) or local (this machine, not isolated).")] = (
        BackendKind.DOCKER
    ),
    image: Annotated[str, typer.Option(help="Sandbox image (docker backend).")] = DEFAULT_CPU_IMAGE,
    cpus: Annotated[float, typer.Option(help="CPU quota, in cores.")] = 1.0,
    memory: Annotated[str, typer.Option(help="Memory limit, e.g. 512m or 2g (swap is not allowed).")] = "2g",
    gpus: Annotated[int | None, typer.Option(help="Number of GPUs to attach.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before the run is interrupted.")] = 600.0,
    runtime: Annotated[str | None, typer.Option(help=RUNTIME_HELP)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON summary as the last line.")] = False,
    server: Annotated[str | None, typer.Option(help="Run on a CellForge server (URL) instead of here.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="CELLFORGE_API_KEY", help="API key for --server.")] = None,
) -> None:
    """Run FILE in a fresh sandbox, streaming its output live.

    Exit status: 0 ok, 1 error, 124 timeout, 125 killed (interrupt failed), 137 died (e.g. out of
    memory), 2 bad input, 3 the sandbox could not start.
    """
    try:
        code = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        err.print(f"[red]cannot read {file}:[/] {exc.strerror if isinstance(exc, OSError) else exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        spec = SandboxSpec.parse(
            dict(image=image, cpus=cpus, memory=memory, gpus=gpus, timeout=timeout, runtime=runtime)
        )
    except SpecError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if runtime and (server or backend is BackendKind.LOCAL):
        where = "the server chooses it per tenant" if server else "the local backend runs no container"
        err.print(f"[red]--runtime applies to docker sandboxes run here; {where}[/]")
        raise typer.Exit(EXIT_BAD_INPUT)
    live = _LiveOutput()
    if server:
        (sandbox_id, res), backend_name, isolated = _run_remote(server, api_key, code, spec, live), "remote", True
    else:
        sb, res = asyncio.run(_run_file(code, spec, backend, timeout, live))
        sandbox_id, backend_name, isolated = sb.id, backend.value, sb.isolated
    if json_out:
        if not live.ends_with_newline:
            sys.stdout.write("\n")
        print(json.dumps(_summary(res, sandbox_id, backend_name, isolated)), flush=True)
    else:
        colour = "green" if res.ok else "red"
        detail = res.died_cause or (f"{res.ename}: {res.evalue}" if res.ename else "")
        err.print(f"[{colour}]{res.outcome.value}[/] in {res.duration_ms / 1000:.2f} s {_safe(detail)}".rstrip())
    raise typer.Exit(EXIT_CODES[res.outcome.value])


@sandbox_app.command("bench")
def bench(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
    n: Annotated[int, typer.Option(min=1, help="Samples for cold start, bare docker run and warm acquire.")] = 10,
    roundtrips: Annotated[int, typer.Option(min=20, help="execute('1+1') round trips.")] = 200,
    max_live: Annotated[int, typer.Option(min=1, help="Most sandboxes to start at once.")] = 30,
    live_memory: Annotated[str, typer.Option(help="Memory limit of each of those sandboxes.")] = "512m",
    image: Annotated[str, typer.Option(help="Sandbox image to measure.")] = DEFAULT_CPU_IMAGE,
    preload: Annotated[str, typer.Option(help="Code the pool runs in each warm sandbox.")] = DEFAULT_PRELOAD,
    runtime: Annotated[str | None, typer.Option(help=RUNTIME_HELP)] = None,
) -> None:
    """Measure cold start, warm acquire, execute round trip and density of Docker sandboxes.

    A bare `docker run --rm IMAGE true` is measured in the same run as the reference.
    """
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        try:
            result = asyncio.run(
                run_bench(
                    DockerBackend(),
                    image,
                    n=n,
                    roundtrips=roundtrips,
                    live_limit=max_live,
                    live_memory=live_memory,
                    preload=preload,
                    runtime=runtime,
                    progress=progress,
                )
            )
        except SandboxError as exc:
            err.print(f"[red]benchmark failed:[/] {exc}")
            raise typer.Exit(1) from None
    if json_out:
        print(result.model_dump_json(), flush=True)
        return
    table = Table(title=f"sandbox bench ({image}, runtime {result.runtime}, n={n})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target met")
    met = result.targets_met
    rows = [
        ("bare docker run p50 (ms)", result.bare_docker_run_ms_p50, None),
        ("cold start p50 (ms)", result.cold_start_ms_p50, met["cold_start_vs_bare"]),
        ("warm acquire p50 (ms)", result.warm_acquire_ms_p50, met["warm_acquire_ms_p50"]),
        ("execute 1+1 p50 (ms)", result.exec_roundtrip_ms_p50, met["exec_roundtrip_ms_p50"]),
        ("execute 1+1 p95 (ms)", result.exec_roundtrip_ms_p95, None),
        (f"live {result.live_memory} sandboxes", result.max_live_sandboxes, met["max_live_sandboxes"]),
    ]
    for label, value, ok in rows:
        table.add_row(label, f"{value:g}", "" if ok is None else ("yes" if ok else "[red]no[/]"))
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.add_typer(sandbox_app, name="sandbox")
