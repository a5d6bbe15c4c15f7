"""Off a terminal a design run's progress is plain lines, one per event, every training epoch included."""

from __future__ import annotations

import io

from rich.console import Console

from service.pipeline import PlainProgress, RichProgress, progress_display
from service.pipeline.progress import epoch_event


def test_a_log_gets_one_plain_line_per_event_with_every_epoch():
    buffer = io.StringIO()
    console = Console(file=buffer, width=1000)
    progress = progress_display(console)
    assert isinstance(progress, PlainProgress)
    with progress:
        for line in ("epoch=1 train_loss=0.5 val_loss=0.6", "refit_epoch=1 loss=0.1",
                     "epoch=2 train_loss=0.25 val_loss=nan", "epoch=3 train_loss=0.125 val_loss=0.375"):
            event = epoch_event(line, attempt=2)
            if event is not None:
                progress(event)
    assert buffer.getvalue().splitlines() == [
        "train [node 2] epoch 1: train loss 0.5000, stopping loss 0.6000",
        "train [node 2] epoch 3: train loss 0.1250, stopping loss 0.3750",
    ]


def test_a_terminal_gets_the_live_display():
    assert isinstance(progress_display(Console(file=io.StringIO(), force_terminal=True)), RichProgress)
