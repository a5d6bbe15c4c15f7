"""Progress of a design run in a notebook or a script: a tqdm bar over the pipeline's phases (a widget in
Jupyter through `tqdm.auto`, a text bar in a terminal), the latest event as its postfix."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from service.pipeline.progress import PHASES, ProgressEvent, event_line


class PhaseBar:
    """`on_progress` for run_design: the bar advances to the furthest phase reached (debugging and improve
    steps come back to earlier ones), and shows each event, training epochs included."""

    def __init__(self, **bar: Any) -> None:
        self.bar = tqdm(total=len(PHASES), desc="design", unit="phase", **bar)

    def __call__(self, event: ProgressEvent) -> None:
        if event.phase in PHASES:
            reached = PHASES.index(event.phase) + 1
            if reached > self.bar.n:
                self.bar.update(reached - self.bar.n)
        self.bar.set_description(event.phase, refresh=False)
        self.bar.set_postfix_str(event_line(event)[len(event.phase):].strip()[:100])

    def __enter__(self) -> PhaseBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
