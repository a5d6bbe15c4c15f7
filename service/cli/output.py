"""What every command group shares: where output goes, `--json`, one-line failures, progress.

Scriptable output: with `--json` stdout holds exactly one JSON document and everything meant for a person
(tables, progress, notes) goes to stderr. Off a terminal (a pipe, a CI log) tables keep their full width
and progress is plain lines instead of a live display.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, NoReturn

import typer
from typer._click.core import Context  # typer vendors click: `click.Context` and `click.UsageError` are other classes
from typer._click.exceptions import UsageError
from typer.core import TyperGroup
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

# Rich cuts a console that is not a terminal to 80 columns ("pearso…"); a log file has no edge to fit.
LOG_WIDTH = 1000


def _console(stderr: bool) -> Console:
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=LOG_WIDTH)


err = _console(stderr=True)
out = _console(stderr=False)

JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON document on stdout (tables and progress go to stderr).")]


def tables(json_out: bool) -> Console:
    """Where tables and other human output go: stdout, or stderr when stdout carries the JSON document."""
    return err if json_out else out


def emit_json(document: dict[str, Any]) -> None:
    """The command's one JSON document on stdout."""
    print(json.dumps(document, default=str), flush=True)


def message(exc: Exception) -> str:
    """An error in words: a validation failure as `field: problem; ...` (not pydantic's text with its URLs)."""
    if isinstance(exc, ValidationError):
        from service.protocol.errors import problems

        return problems(exc)
    return str(exc)


def fail(exc: Exception, json_out: bool) -> NoReturn:
    """Report an error in one readable line (and as the JSON document with --json), exit 1."""
    text = message(exc)
    err.print(f"[red]{type(exc).__name__}:[/] {text}", highlight=False)
    if json_out:
        emit_json({"ok": False, "error": type(exc).__name__, "message": text})
    raise typer.Exit(1)


def spinner() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


class JsonUsageErrors(TyperGroup):
    """The top-level group: a usage error (exit 2: unknown option, bad choice, missing argument) on a command
    line that has `--json` is also the one JSON document on stdout, so a script parsing stdout learns why;
    typer still prints its human message on stderr and exits 2."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: Context | None = None, **extra: Any
    ) -> Context:
        argv = list(args)
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as exc:
            _usage_json(exc, argv)
            raise
        ctx.meta["cellforge.argv"] = argv
        return ctx

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:  # raised while a subcommand parses its own options
            _usage_json(exc, ctx.meta.get("cellforge.argv", []))
            raise


def _usage_json(exc: UsageError, argv: Sequence[str]) -> None:
    if "--json" in argv:
        emit_json({"ok": False, "error": "UsageError", "message": exc.format_message(), "exit_code": exc.exit_code})
