"""Running one search node: its bundle in a fresh sandbox per validation fold (each sandbox mounts only
that fold's model files), the outputs checked and the val predictions scored by the service, pooled over
the folds. Everything lands in the node's folder `attempts/NN/`: code/, plan.json, runs/<fold>/ (logs,
outputs, outcome.json), outcome.json (the failing or first run), validation.json and node.json."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from service.data.evaluate import EvaluationReport, Evaluator
from service.pipeline.budget import FALLBACK_RUN_SECONDS, Forecast, project_step
from service.pipeline.codegen.manifest import check_implements
from service.pipeline.execute import AttemptOutcome, SandboxSettings, StepFailure, run_attempt, save_outcome
from service.pipeline.progress import ProgressCallback, ProgressEvent
from service.pipeline.rundir import RunDir
from service.pipeline.search import Node, SearchTree
from service.pipeline.selection import PooledScore, Selection
from service.pipeline.validate import Validation, check_run

MAIN = "main"  # the run on the whole split's model files (test predictions) of a cross-validated search


@dataclass
class NodeResult:
    """What the search and the debugger need beyond the node's own record."""

    failure: StepFailure | None
    problems: list[str]
    pooled: PooledScore | None


class NodeRunner:
    def __init__(self, rd: RunDir, selection: Selection, test_eval: Evaluator, primary: str,
                 sandbox: SandboxSettings, deadline: float, started: float, on_progress: ProgressCallback,
                 mean_baseline: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rd, self.selection, self.test_eval, self.primary = rd, selection, test_eval, primary
        self.sandbox, self.deadline, self.started, self.emit = sandbox, deadline, started, on_progress
        self.mean_baseline = mean_baseline
        self.clock = clock  # the budget's clock (deadline and started are on it)
        self.reserve = 0.0  # seconds a node's runs leave to the finish (the improve loop sets it)
        self.results: dict[int, NodeResult] = {}
        self.run_seconds: list[float] = []  # wall time of each sandbox run, for the time budget
        self.node_times: list[float] = []  # wall time of each node that ran every fold, for the time budget
        self.main_runs: dict[int, tuple[Path | None, str | None]] = {}
        # Folds after the first run side by side when the host has the cores for their CPU quotas.
        self.parallel = max(1, min(len(selection.folds) - 1, (os.cpu_count() or 1) // max(1, math.ceil(sandbox.cpus))))

    def time_left(self) -> float:
        return self.deadline - self.clock()

    def run_time_left(self) -> float:
        """What one more sandbox run may take: the time left less the finish's reserve."""
        return self.time_left() - self.reserve

    def node_dir(self, node: Node) -> Path:
        return self.rd.attempt(node.id)

    def run_dir(self, node: Node, fold: str) -> Path:
        return self.node_dir(node) / "runs" / fold

    def _fold_run(self, node: Node, index: int) -> AttemptOutcome:
        fold = self.selection.folds[index]
        self.emit(ProgressEvent("sandbox", f"node {node.id} ({node.label}): fold {fold.name}", attempt=node.id))
        return self._sandbox_run(node, fold.data, self.run_dir(node, fold.name), index == 0 and node.tested)

    def _sandbox_run(self, node: Node, data: Path, where: Path, run_tests: bool) -> AttemptOutcome:
        began = self.clock()
        outcome = run_attempt(self.node_dir(node) / "code", data, where, node.id, self.sandbox, self.run_time_left(),
                              self.emit, run_tests=run_tests)
        save_outcome(where, outcome)
        self.run_seconds.append(self.clock() - began)
        return outcome

    def run(self, node: Node, tree: SearchTree) -> NodeResult:
        """Run, check and score `node` on every fold; fill its validation and status in `tree`."""
        began = self.clock()
        node.started = began - self.started
        folder = self.node_dir(node)
        node.bundle.write(folder / "code")
        (folder / "plan.json").write_text(node.plan.model_dump_json(indent=1) + "\n")
        failure, problems, shown = None, [], None
        reports: dict[str, EvaluationReport] = {}
        folds = self.selection.folds
        # The first fold alone (it runs the tests: broken code stops there), then the others side by side.
        outcomes = [self._fold_run(node, 0)] if self.run_time_left() > 10 else []
        if outcomes and outcomes[0].failure is None and len(folds) > 1:
            with ThreadPoolExecutor(self.parallel) as workers:
                outcomes += list(workers.map(lambda i: self._fold_run(node, i), range(1, len(folds))))
        for fold, outcome in zip(folds, outcomes, strict=False):
            shown = shown or outcome
            if outcome.failure is not None:
                failure, shown = outcome.failure, outcome
                break
            check = check_run(outcome.out_dir, fold.evaluator, self.test_eval)
            if check.problems:
                problems, shown = check.problems, outcome
                break
            assert check.report is not None  # a run without problems was scored
            reports[fold.name] = check.report
        if len(outcomes) < len(folds) and failure is None and not problems:
            problems = ["time budget spent before every validation fold ran"]
        if failure is None:  # the code ran: does it implement the plan it was generated from?
            problems += check_implements(node.plan, node.bundle.files)
        if shown is not None:
            save_outcome(folder, shown)
        pooled = self.selection.pool(reports) if len(reports) == len(self.selection.folds) else None
        score = pooled.get(self.primary) if pooled else None
        if pooled is not None and score is None:
            problems.append(f"validation {self.primary} is not finite: the predictions carry no signal to score")
        ok = failure is None and not problems and pooled is not None
        node.validation = Validation(ok, problems, self.primary, score, self.mean_baseline,
                                     dict(pooled.summary) if pooled else {}, pooled.n_conditions if pooled else 0)
        node.failure = failure.summary() if failure else ("; ".join(problems) or None)
        node.seconds = self.clock() - began
        if len(outcomes) == len(folds) and all(o.failure is None for o in outcomes):
            self.node_times.append(node.seconds)  # it ran to the end: a measure of the next node
        result = NodeResult(failure, problems, pooled)
        self.results[node.id] = result  # before the judging, which reads it
        tree.judge(node)
        self.save(node)
        if ok:
            self.emit(ProgressEvent("validate", f"node {node.id} ({node.label}): {self.primary}={score:.4f} "
                                                f"[{node.status}]", attempt=node.id))
        return result

    def save(self, node: Node) -> None:
        folder = self.node_dir(node)
        if node.validation is not None:
            self.rd.write_json(folder / "validation.json", {**node.validation.__dict__, "candidate": node.candidate})
        self.rd.write_json(folder / "node.json", node.to_json())

    def pooled(self, node: Node) -> PooledScore:
        """A working node's validation scores, pooled over the folds."""
        pooled = self.results[node.id].pooled
        assert pooled is not None, f"node {node.id} has no validation scores"
        return pooled

    def val_predictions(self, node: Node) -> dict[str, Path]:
        return {f.name: self.run_dir(node, f.name) / "out" / "val_predictions.h5ad" for f in self.selection.folds}

    def mean_run_seconds(self) -> float:
        return sum(self.run_seconds) / len(self.run_seconds) if self.run_seconds else FALLBACK_RUN_SECONDS

    def forecast(self, step: str) -> Forecast:
        """Does one more node fit in the time left, `self.reserve` kept for the finish? (`budget.project_step`)"""
        rounds = min(1 + math.ceil((len(self.selection.folds) - 1) / self.parallel), len(self.selection.folds))
        return Forecast(step, project_step(self.node_times, self.run_seconds, rounds), self.time_left(), self.reserve)

    def test_outputs(self, node: Node) -> tuple[Path | None, str | None]:
        """The folder of the node's outputs on the whole split (test predictions, weights): the val run's in
        a holdout search; in a cross-validated one, a further run on the whole split's model files (made
        once). Returns (folder, None) or (None, why it failed)."""
        if self.selection.mode == "holdout":
            return self.run_dir(node, self.selection.folds[0].name) / "out", None
        if node.id not in self.main_runs:
            self.emit(ProgressEvent("deliver", f"node {node.id}: training on the whole training split for the "
                                               "test predictions", attempt=node.id))
            outcome = self._sandbox_run(node, self.selection.main_data, self.run_dir(node, MAIN), run_tests=False)
            why = outcome.failure.summary() if outcome.failure else \
                "; ".join(check_run(outcome.out_dir, None, self.test_eval).problems) or None
            self.main_runs[node.id] = (None, why) if why else (outcome.out_dir, None)
        return self.main_runs[node.id]
