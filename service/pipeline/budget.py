"""The design's wall-clock budget and the rule that decides whether one more search step fits in it.

The budget (`--max-minutes`, default `DEFAULT_MAX_MINUTES`) is for the whole design, counted from its start:
profile, split, selection, every sandbox run and the finish (competition, delivery, test scoring, report);
only the LLM's own time is given back (it has a budget of its own). The improve loop spends what is left
rather than a fixed count of steps: before each step (and before the debug child of a failed one) the step
is projected from the nodes that ran so far, and it starts only when the projection fits in the time left
after the reserve kept for the finish, and its sandbox runs are cut at that reserve. A step that does not fit
is recorded with its numbers (the search tree's `stopped` and `skipped`, drawn in the report) and the search
ends there. Drafts (and their debugging) are not projected, a first working model being worth the risk, but
their runs are cut where the finish's own work (scoring, cell-eval, the report) must begin; on a host too busy
for even a draft within the budget, the run delivers the best baseline and says no designed model trained.

Why 15 minutes by default: issue 13's target is a design within 15 minutes on 2 CPU cores, and at
1,000,000 cells x 2,000 genes (issue 17) simulation takes ~4 of the 20 minutes end to end, profile and split
~4.5, the finish ~1.5 and one sandbox run on the 100,000-cell sample ~3.5, so a 15-minute design leaves room
for the draft (and its debugging) and ends inside the 20 minutes; small data get as many improve steps as
the rules (or the LLM) propose within the same 15 minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_MAX_MINUTES = 15.0
SAFETY = 1.3  # a step may take longer than the mean (a wider network, more epochs, a busier host)
FALLBACK_RUN_SECONDS = 60.0  # one sandbox run, before any was measured


def project_step(node_seconds: Sequence[float], run_seconds: Sequence[float], rounds: int) -> float:
    """Seconds one more node is expected to take: `SAFETY` × the mean wall time of the nodes that ran every
    fold so far (their sandbox runs, side by side where they can, and the service's scoring); before any did,
    `SAFETY` × the mean sandbox run (`FALLBACK_RUN_SECONDS` before any ran) × the `rounds` of runs one node
    takes."""
    if node_seconds:
        return SAFETY * sum(node_seconds) / len(node_seconds)
    run = sum(run_seconds) / len(run_seconds) if run_seconds else FALLBACK_RUN_SECONDS
    return SAFETY * run * max(1, rounds)


@dataclass(frozen=True)
class Forecast:
    """Whether the next step fits: its projection against the time left, of which `reserve` is kept for
    what follows the search."""

    step: str  # "improve" or "debug"
    projected: float
    left: float
    reserve: float

    @property
    def fits(self) -> bool:
        return self.projected <= self.left - self.reserve

    def reason(self) -> str:
        return (f"budget: next {self.step} step projected {self.projected:.0f} s, {self.left:.0f} s left "
                f"({self.reserve:.0f} s of them kept for the finish)")

    def to_json(self) -> dict[str, object]:
        return {"step": self.step, "reason": "budget", "projected_s": round(self.projected, 1),
                "left_s": round(self.left, 1), "reserve_s": round(self.reserve, 1), "detail": self.reason()}
