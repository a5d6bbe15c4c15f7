"""What every command group shares: the error console, `--json`, one-line failures, a progress spinner."""

from __future__ import annotations

import json
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]


def fail(exc: Exception, json_out: bool) -> NoReturn:
    """Report an error in one readable line (and as JSON with --json), exit 1."""
    err.print(f"[red]{type(exc).__name__}:[/] {exc}", highlight=False)
    if json_out:
        print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}), flush=True)
    raise typer.Exit(1)


def spinner() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                    console=err, transient=True)
