"""Live progress of a design run: typed events, a rich live renderer for a terminal and plain lines for logs."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table

PHASES = ("profile", "analysis", "discussion", "split", "codegen", "sandbox", "pytest", "train", "validate",
          "debug", "improve", "compete", "deliver", "evaluate", "report", "done",
          "llm")  # llm: a streamed reply's tokens so far, during any phase


@dataclass(frozen=True)
class ProgressEvent:
    phase: str
    message: str = ""
    round: int | None = None
    attempt: int | None = None
    epoch: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]

# `epoch=` of the early-stopping phase only: the refit's `refit_epoch=` lines have no stopping loss.
_EPOCH_LINE = re.compile(r"\bepoch=(\d+) train_loss=(\S+) val_loss=(\S+)")


def epoch_event(line: str, attempt: int) -> ProgressEvent | None:
    """The progress event of one `epoch=E train_loss=… val_loss=…` line printed by train.py."""
    match = _EPOCH_LINE.search(line)
    if not match:
        return None
    try:  # generated code prints what it likes: `val_loss=None` is no reason to stop a run
        epoch, train_loss, val_loss = (float(x) for x in match.groups())
    except ValueError:
        return None
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):  # events travel as JSON: no NaN
        return None
    return ProgressEvent("train", f"epoch {int(epoch)}", attempt=attempt, epoch=int(epoch), train_loss=train_loss,
                         val_loss=val_loss)


def event_line(event: ProgressEvent) -> str:
    """One event as a plain line: `train [node 2] epoch 5: train loss 0.1234, stopping loss 0.2345`."""
    where = f" [node {event.attempt}]" if event.attempt is not None else ""
    where += f" [round {event.round}]" if event.round is not None else ""
    if event.epoch is not None and event.train_loss is not None and event.val_loss is not None:
        return (f"{event.phase}{where} epoch {event.epoch}: train loss {event.train_loss:.4f}, "
                f"stopping loss {event.val_loss:.4f}")
    return f"{event.phase}{where} {event.message}".rstrip()


class PlainProgress:
    """Every event as a line (training epochs included), for a log or a pipe where a live display cannot draw."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __call__(self, event: ProgressEvent) -> None:
        self.console.print(event_line(event), markup=False, highlight=False, soft_wrap=True)


def progress_display(console: Console) -> RichProgress | PlainProgress:
    """A live display on a terminal, plain lines elsewhere."""
    return RichProgress(console) if console.is_terminal else PlainProgress(console)


class RichProgress:
    """A live status table (phase, round, attempt, epoch, losses) plus one printed line per milestone."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.state: dict[str, str] = {"phase": "-", "round": "-", "attempt": "-", "epoch": "-", "loss": "-",
                                      "llm": "-", "message": ""}
        self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=True)

    def _table(self) -> Table:
        table = Table(show_header=True, header_style="bold")
        for key in self.state:
            table.add_column(key)
        table.add_row(*self.state.values())
        return table

    def __enter__(self) -> RichProgress:
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.__exit__(*exc)

    def __call__(self, event: ProgressEvent) -> None:
        if event.phase == "llm":  # a streamed reply's tokens so far: a column of its own, no milestone
            self.state["llm"] = event.message[:40]
            self.live.update(self._table())
            return
        # Each debugging step is a milestone (its diagnosis, or that its patch did not apply).
        if (event.phase != self.state["phase"] and event.phase != "train") or event.phase == "debug":
            self.console.print(f"[bold]{event.phase}[/bold] {event.message}")
        self.state["phase"] = event.phase
        self.state["message"] = event.message[:80]
        if event.round is not None:
            self.state["round"] = str(event.round)
        if event.attempt is not None:
            self.state["attempt"] = str(event.attempt)
        if event.epoch is not None:
            self.state["epoch"] = str(event.epoch)
            self.state["loss"] = f"train {event.train_loss:.4f} / stop {event.val_loss:.4f}"
        self.live.update(self._table())
