"""The time-aware design search: the projection rule, and a design on a real local sandbox whose clock makes
every node take 2,000 s more, so the budget admits exactly one improve step and records why the search
stopped (search.json, metrics, the report)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from service.pipeline.budget import FALLBACK_RUN_SECONDS, SAFETY, Forecast, project_step


def test_a_step_is_projected_from_the_nodes_that_ran_to_the_end():
    assert project_step([100.0, 300.0], [50.0, 60.0, 70.0], rounds=2) == pytest.approx(SAFETY * 200.0)
    # Before any node ran every fold: the mean sandbox run, times the rounds of runs a node takes.
    assert project_step([], [40.0, 80.0], rounds=3) == pytest.approx(SAFETY * 60.0 * 3)
    assert project_step([], [], rounds=1) == pytest.approx(SAFETY * FALLBACK_RUN_SECONDS)


def test_a_step_fits_only_when_its_projection_ends_before_the_reserve():
    assert Forecast("improve", projected=100.0, left=300.0, reserve=200.0).fits
    late = Forecast("improve", projected=100.1, left=300.0, reserve=200.0)
    assert not late.fits
    assert late.reason() == "budget: next improve step projected 100 s, 300 s left (200 s of them kept for the finish)"
    assert late.to_json()["projected_s"] == 100.1 and late.to_json()["reason"] == "budget"


STRETCH = 2000.0  # seconds the clock jumps when a node's first sandbox starts training


class StretchedClock:
    """Monotonic time, plus STRETCH seconds for each node that starts training (seen in the progress events:
    the first fold's training of each attempt)."""

    def __init__(self) -> None:
        self.extra, self.lock, self.nodes = 0.0, threading.Lock(), set[int]()

    def __call__(self) -> float:
        with self.lock:
            return time.monotonic() + self.extra

    def on_progress(self, event) -> None:
        if event.phase == "train" and event.epoch is None and event.message == "training":
            with self.lock:
                if event.attempt not in self.nodes:
                    self.nodes.add(event.attempt)
                    self.extra += STRETCH


@pytest.mark.slow  # a whole design in local sandboxes (a draft and one improve node; 3-6 min on 2 busy cores)
@pytest.mark.timeout(900)
def test_the_search_stops_when_the_next_step_is_projected_past_the_budget(knockout_data, tmp_path):
    from service.pipeline import DesignSettings, run_design

    clock = StretchedClock()
    # A node takes ~2,000 s on this clock: after the draft the first improve step (projected 1.3 x 2,000 s) fits
    # in 125 minutes with the finish's reserve (one run, and in a cross-validated search 1.5 more), after it the
    # second does not (whichever the validation, unless a node really takes over ~5 minutes). A validation fold
    # of 30% of the genes holds enough of them to decide: one sandbox run per node.
    result = run_design(DesignSettings(data=knockout_data, task="Predict expression after knockout of unseen genes",
                                       out=tmp_path / "run", sandbox="local", max_minutes=125, max_attempts=2,
                                       val_fraction=0.3), on_progress=clock.on_progress, clock=clock)
    assert result.metrics["val"]["mode"] == "holdout"
    assert result.status == "validated", result.metrics
    tree = json.loads((result.run_dir / "search.json").read_text())
    ran = [n for n in tree["nodes"] if n["status"] != "rejected"]
    assert [n["kind"] for n in ran][:1] == ["draft"] and ran[0]["seconds"] >= STRETCH
    assert sum(n["kind"] == "improve" for n in ran) == 1, tree["nodes"]
    stopped = tree["stopped"]
    assert stopped["reason"] == "budget" and stopped["detail"].startswith("budget: next improve step projected")
    assert stopped["projected_s"] > stopped["left_s"] - stopped["reserve_s"]
    complete = [n["seconds"] for n in ran if n["failure"] is None]
    assert stopped["projected_s"] == pytest.approx(SAFETY * sum(complete) / len(complete), abs=0.5)
    assert tree["skipped"][-1]["step"] == "improve" and tree["skipped"][-1]["after_node"] == tree["nodes"][-1]["id"]
    assert result.metrics["search"]["stopped"] == stopped
    assert "Search stopped (budget): budget: next improve step projected" in (result.run_dir / "report.html").read_text()


def test_a_replay_skips_the_steps_its_record_skipped_and_runs_the_others(tmp_path):
    from types import SimpleNamespace

    from service.pipeline.run import Search, _skips_recorded

    (tmp_path / "search.json").write_text(json.dumps({"skipped": [
        {"after_node": 3, "step": "debug", "reason": "budget", "projected_s": 500.0, "left_s": 100.0,
         "reserve_s": 50.0, "detail": "budget: next debug step projected 500 s, 100 s left"}]}))
    assert _skips_recorded(tmp_path) == {("debug", 3)}
    assert _skips_recorded(tmp_path / "no-run") == set() and _skips_recorded(None) == set()

    # The replaying machine's clock is not asked (a runner without one): the record decides.
    search = Search(SimpleNamespace(), None, None, "mse", "unseen-perturbation", {}, 2,  # type: ignore[arg-type]
                    recorded_skips=_skips_recorded(tmp_path))
    assert search._fits("debug", 2) and search._fits("improve", 3)
    assert not search._fits("debug", 3)
    assert search.tree.skipped == [{"after_node": 3, "step": "debug", "reason": "budget",
                                    "detail": "budget: skipped as in the recorded run (debug after node 3)"}]
