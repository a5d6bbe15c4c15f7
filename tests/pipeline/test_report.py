"""report.html of a run whose designed model ran out of memory: a real split, real baseline scores and the
delivered baseline's predictions, the offline experts' plan, a search tree with the failed node, then the
page itself, read as HTML and opened in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import service.data.chunks as chunks
import service.data.load as load
from service.agents import analyse_task, handlers, run_discussion
from service.data import make_split, simulate
from service.data.baselines import run_baselines
from service.data.evaluate import Evaluator
from service.llm import OfflineBackend
from service.pipeline.codegen import Bundle
from service.pipeline.report import (
    WHY_EMPTY,
    delta_points,
    failure_notes,
    kept_epoch,
    plotted_conditions,
    write_report,
)
from service.pipeline.rundir import RunDir
from service.pipeline.search import Node, SearchTree
from service.pipeline.verdict import build_verdict

from agent_profiles import TASKS

PRIMARY = "pearson_delta_pert"
OOM = "train.py failed: python exited with code -9"


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory) -> RunDir:
    rd = RunDir(tmp_path_factory.mktemp("report") / "run").create()
    data = rd.root.parent / "knockout.h5ad"
    simulate("knockout", 0, n_cells=2500, n_genes=120, n_perturbations=24).write_h5ad(data)
    make_split(data, "unseen-perturbation", 0, rd.split, val_fraction=0.2)
    test_eval = Evaluator(rd.split, "test")
    predictions = run_baselines(rd.split, "test")
    reports = {name: test_eval.score(p) for name, p in predictions.items()}
    summaries = {name: r.summary for name, r in reports.items()}
    delivered = max((n for n in summaries if PRIMARY in summaries[n]), key=lambda n: summaries[n][PRIMARY])
    predictions[delivered].write_h5ad(rd.predictions)
    verdict = build_verdict(
        status="failed", primary=PRIMARY, delivered=f"baseline:{delivered}", delivered_reason="best on validation",
        model_val=None, model_test=None, baselines_val=summaries, baselines_test=summaries, model_rows=None,
        baseline_rows={n: r.per_condition for n, r in reports.items()}, delivered_val=summaries[delivered],
        delivered_test=summaries[delivered], validation="held-out perturbations", n_val_conditions=12,
        n_test_conditions=reports[delivered].n_conditions)
    metrics = {
        "primary_metric": PRIMARY, "status": "failed", "verdict": verdict.model_dump(mode="json"),
        "delivered": {"kind": "baseline", "name": delivered, "key": f"baseline:{delivered}", "test": summaries[delivered],
                      "per_condition": reports[delivered].per_condition, "code_check": {"ran": True}},
        "baselines": summaries, "baselines_per_condition": {n: r.per_condition for n, r in reports.items()},
        "ceiling": reports[delivered].ceiling, "attempts": 1, "chosen_attempt": None,
    }
    llm = OfflineBackend(handlers())
    facts, task = TASKS["knockout"]
    discussion = run_discussion(analyse_task(facts, task, llm), facts, llm, rd.root)
    analysis = analyse_task(facts, task, llm)
    tree = SearchTree(PRIMARY)
    tree.add(Node(id=1, parent=None, kind="draft", label="draft 1", candidate=1, plan=discussion.plan,
                  bundle=Bundle(files={}), status="buggy", failure=OOM))
    rd.run_json.write_text(json.dumps({"settings": {"memory": "2g"}}))
    rd.train_log.write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / e, "val_loss": abs(e - 3) + 0.5,
                                                "phase": "select"}) + "\n" for e in range(1, 7)))
    rd.write_json(rd.metrics, metrics)
    write_report(rd, discussion.plan, analysis, discussion, metrics, tree)
    return rd


def _page(rd: RunDir) -> str:
    return rd.report.read_text()


def test_failure_is_explained_at_the_top_with_the_memory_hint(failed_run):
    page = _page(failed_run)
    assert "out of memory at 2 GB; try --memory" in page
    top = page.index('class="failure"')
    assert top < page.index('class="verdict"') < page.index("Metrics on the test split")
    assert "chosen attempt: None" not in page and "no designed node trained" in page
    box = page[top:page.index('class="verdict"')]
    assert "code -9" not in box  # the cause replaces the raw exit code
    assert "baselines below were still scored" in box


def test_baselines_are_scored_and_the_best_in_each_column_is_marked(failed_run):
    page = _page(failed_run)
    metrics = json.loads(failed_run.metrics.read_text())
    table = page[page.index("Metrics on the test split"):page.index("Per test condition")]
    for name in metrics["baselines"]:
        assert f"<td class=name>{name}</td>" in table
    best = max(s[PRIMARY] for s in metrics["baselines"].values() if PRIMARY in s)
    assert f'<td class="best">★ {best:.4f}</td>' in table
    assert f"{PRIMARY} ↑" in table and "mse_top20_de ↓" in table


def test_no_nan_anywhere_and_undefined_cells_are_explained(failed_run):
    page = _page(failed_run)
    assert not re.search(r"\bnan\b", page, re.I)
    assert WHY_EMPTY in page
    control = page[page.index("<td class=name>control</td>"):]
    assert 'class="na"' in control[:control.index("</tr>")]  # the control baseline's Δ correlations


def test_per_condition_table_has_every_test_condition(failed_run):
    page = _page(failed_run)
    rows = json.loads(failed_run.metrics.read_text())["delivered"]["per_condition"]
    section = page[page.index("Per test condition"):page.index("Predicted vs true")]
    assert len(rows) >= 5 and all(f"<td class=name>{r['condition']}</td>" in section for r in rows)
    assert "delivered better?" in section


def test_plots_follow_the_stated_rule_best_median_worst():
    rows = [{"condition": f"c{i}", PRIMARY: v} for i, v in enumerate([0.1, 0.9, None, 0.5, 0.3, 0.7])]
    picks = plotted_conditions(rows, PRIMARY)
    assert [c for _, c in picks] == ["c1", "c3", "c0"]
    assert picks[0][0].startswith("best") and picks[2][0].startswith("worst")
    lower = plotted_conditions([{"condition": "a", "mse": 2.0}, {"condition": "b", "mse": 1.0}], "mse")
    assert [c for _, c in lower] == ["b", "a"]


def test_plotted_deltas_read_by_chunks_are_those_of_the_whole_files(failed_run, monkeypatch):
    """The Δ plots' points with the truth and inputs opened backed and read 3 cells at a time equal the
    points computed from the whole files in memory (mean of the condition's truth cells minus the mean of
    its context's control cells, top 20 genes by |true Δ|)."""
    rows = json.loads(failed_run.metrics.read_text())["delivered"]["per_condition"]
    picks = plotted_conditions(rows, PRIMARY)
    truth, inputs, pred = (ad.read_h5ad(p) for p in (failed_run.split / "test_truth.h5ad",
                                                     failed_run.split / "test_inputs.h5ad", failed_run.predictions))
    expected = []
    for label, condition in picks:
        row = int(np.flatnonzero(pred.obs["condition"].astype(str) == condition)[0])
        context = str(pred.obs["context"].iloc[row])
        ctrl = inputs[(inputs.obs["is_control"].astype(bool) & (inputs.obs["context"].astype(str) == context))
                      .to_numpy()].X.toarray().mean(axis=0)
        true = truth[(truth.obs["condition"].astype(str) == condition).to_numpy()].X.toarray().mean(axis=0) - ctrl
        order = [list(truth.var_names).index(g) for g in pred.var_names]
        true, predicted = true[order], np.asarray(pred.X[row]).ravel() - ctrl[order]
        top = np.argsort(-np.abs(true))[:20]
        expected.append((label, condition, true[top], predicted[top]))

    monkeypatch.setattr(chunks, "ROW_CHUNK", 3)
    monkeypatch.setattr(load, "BACKED_ABOVE_BYTES", 0)  # truth and inputs opened backed, read chunk by chunk
    points = delta_points(failed_run, picks)
    assert len(points) == len(picks) >= 2
    for (label, condition, true, predicted), want in zip(points, expected, strict=True):
        assert (label, condition) == want[:2]
        np.testing.assert_allclose(true, want[2], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(predicted, want[3], rtol=1e-5, atol=1e-6)


def test_report_states_the_plot_rule_glossary_and_kept_epoch(failed_run):
    page = _page(failed_run)
    assert "the best, the median and the worst" in page
    glossary = page[page.index("Metric glossary"):]
    assert "<code>mse_top20_de</code></td><td>↓ lower is better" in glossary
    assert "<code>discrimination_l1</code></td><td>↑ higher is better" in glossary
    assert "epoch 3" in page
    assert kept_epoch(failed_run.root, [{"epoch": 1, "val_loss": 2.0}, {"epoch": 2, "val_loss": 1.0}]) == 2


def test_failure_notes_recognise_every_way_a_sandbox_reports_an_oom():
    for text in ("python exited with code -9", "kernel died: out of memory", "signal 9", "OOMKilled"):
        notes = failure_notes({"status": "failed"}, {"nodes": [{"failure": text}]}, "4g")
        assert notes == ["out of memory at 4 GB; try --memory with more (e.g. --memory 8g)"], text
    other = failure_notes({"status": "failed"}, {"nodes": [{"failure": "pytest failed: test_shapes"}]}, "4g")
    assert other == ["pytest failed: test_shapes"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def headless(url: str, screenshot: Path) -> str:
    """Open `url` in headless Chromium, save a screenshot, return the browser's log (stderr)."""
    assert CHROMIUM is not None
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", f"--screenshot={screenshot}",
                           "--window-size=1280,2400", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def console_messages(log: str) -> list[str]:
    """Console output of the page (errors, warnings, logs, failed loads) as Chromium logs it."""
    return [line for line in log.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")
def test_report_renders_in_a_real_browser_without_console_errors(failed_run, tmp_path):
    shot = tmp_path / "report.png"
    log = headless(failed_run.report.as_uri(), shot)
    assert console_messages(log) == []
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered page, not a blank one
    # The check itself sees a console error when a page has one.
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><script>console.error('broken report')</script>")
    assert any("broken report" in m for m in console_messages(headless(bad.as_uri(), tmp_path / "bad.png")))
