"""The design pipeline, end to end: profile → task analysis → discussion → Plan → split → code
generation → sandbox attempts with the debugging agent → evaluation on test → report.

Integrity: the service owns the split; a sandbox sees only train, val and test inputs (`sandbox_data/`);
attempts are chosen by validation, never by test; the service's evaluator computes every reported score.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.agents import DiscussionEvent, Plan, analyse_task, handlers as agent_handlers, run_discussion
from service.data import make_split, profile_dataset
from service.data.baselines import run_baselines
from service.data.evaluate import Evaluator
from service.llm import Backend, LLMConfig, make_backend, summarize_run
from service.pipeline.candidates import candidate_plans
from service.pipeline.codegen import Bundle, render_bundle
from service.pipeline.codegen.request import CODEGEN, codegen_request, offline_codegen
from service.pipeline.debugger import (DEBUG, DebugPatch, PatchError, apply_patch, debug_context, debug_request,
                                       offline_debug, unified_diff)
from service.pipeline.execute import SandboxSettings, run_attempt, save_outcome
from service.pipeline.progress import ProgressCallback, ProgressEvent
from service.pipeline.report import write_report
from service.pipeline.rundir import RunDir
from service.pipeline.validate import Validation, better, validate_outputs

Status = Literal["validated", "below_baseline", "failed"]
FINAL_OUTPUTS = ("predictions.h5ad", "val_predictions.h5ad", "model.pt", "val_metrics.json", "train_log.jsonl")


class PipelineError(RuntimeError):
    """The design run could not proceed (bad arguments, a replay that does not match its record)."""


class DesignSettings(BaseModel):
    """The arguments of a design run (saved as run.json; `replay` re-reads them)."""

    data: Path
    task: str = Field(min_length=1)
    out: Path
    seed: int = Field(0, ge=0)
    max_attempts: int = Field(4, ge=1, le=50)
    max_minutes: float = Field(30.0, gt=0)
    max_rounds: int = Field(4, ge=1, le=20)
    sandbox: Literal["docker", "local"] = "docker"
    gpus: int = Field(0, ge=0)
    image: str | None = None
    memory: str = "4g"
    cpus: float = 2.0
    max_genes: int | None = Field(None, ge=10, description="cap on the genes kept by the split")
    candidates: int = Field(1, ge=1, le=7, description="plans tried (the discussion's + variants); best by val")
    held_out_context: str | None = Field(None, description="unseen-context splits: the context to hold out "
                                                           "(default: one drawn with the seed)")

    def sandbox_settings(self) -> SandboxSettings:
        return SandboxSettings(backend=self.sandbox, image=self.image, gpus=self.gpus, cpus=self.cpus,
                               memory=self.memory)


@dataclass
class AttemptRecord:
    number: int
    validation: Validation | None
    failure: str | None
    patch: DebugPatch | None = None
    seconds: float = 0.0
    candidate: int = 1


@dataclass
class DesignResult:
    run_dir: Path
    status: Status
    metrics: dict[str, Any]
    attempts: list[AttemptRecord] = field(default_factory=list)


def pipeline_handlers() -> dict[str, Any]:
    """The offline backend's handlers: the agents' plus code generation and the debugger's rules."""
    return {**agent_handlers(), CODEGEN: offline_codegen, DEBUG: offline_debug}


def _with_seed(plan: Plan, seed: int) -> Plan:
    return plan.model_copy(update={"training": plan.training.model_copy(update={"seed": seed})})


def _discussion_progress(on_progress: ProgressCallback):
    def emit(event: DiscussionEvent) -> None:
        on_progress(ProgressEvent("discussion", event.message, round=event.round))
    return emit


def _run_attempts(rd: RunDir, bundle: Bundle, llm: Backend, settings: DesignSettings, deadline: float,
                  val_eval: Evaluator, test_eval: Evaluator, primary: str, on_progress: ProgressCallback,
                  first: int = 1, candidate: int = 1) -> list[AttemptRecord]:
    """Attempts of one candidate bundle until one validates or its budget (attempts, time) is spent."""
    records: list[AttemptRecord] = []
    data_dir = rd.sandbox_data
    for number in range(first, first + settings.max_attempts):
        time_left = deadline - time.monotonic()
        if time_left <= 10:
            on_progress(ProgressEvent("debug", "time budget spent", attempt=number))
            break
        attempt_dir = rd.attempt(number)
        code_dir = bundle.write(attempt_dir / "code")
        outcome = run_attempt(code_dir, data_dir, attempt_dir, number, settings.sandbox_settings(), time_left,
                              on_progress)
        save_outcome(attempt_dir, outcome)
        validation = None
        if outcome.failure is None:
            on_progress(ProgressEvent("validate", "scoring val predictions", attempt=number))
            validation = validate_outputs(outcome.out_dir, val_eval, test_eval, primary)
            rd.write_json(attempt_dir / "validation.json", {**validation.__dict__, "candidate": candidate})
        record = AttemptRecord(number, validation, outcome.failure.summary() if outcome.failure else None,
                               seconds=outcome.seconds, candidate=candidate)
        records.append(record)
        if validation is not None and validation.ok:
            on_progress(ProgressEvent("validate", f"attempt {number} validated: {primary}={validation.val_score:.4f} "
                                      f"(mean baseline {validation.mean_baseline_score:.4f})", attempt=number))
            break
        if number == first + settings.max_attempts - 1:
            break
        problems = validation.problems if validation else []
        on_progress(ProgressEvent("debug", outcome.failure.summary() if outcome.failure else "; ".join(problems),
                                  attempt=number))
        patch = llm.ask(debug_request(debug_context(number, outcome.failure, problems, bundle)))
        assert isinstance(patch, DebugPatch)
        record.patch = patch
        rd.write_json(attempt_dir / "diagnosis.json", patch.model_dump(mode="json"))
        if patch.give_up:
            on_progress(ProgressEvent("debug", f"no fix: {patch.diagnosis}", attempt=number))
            break
        try:
            patched = apply_patch(bundle, patch)
        except PatchError as exc:
            rd.write_json(attempt_dir / "patch_error.json", {"error": str(exc)})
            on_progress(ProgressEvent("debug", f"patch did not apply: {exc}", attempt=number))
            break
        (attempt_dir / "patch.diff").write_text(unified_diff(bundle, patched))
        on_progress(ProgressEvent("debug", f"{patch.failure_class}: {patch.diagnosis}", attempt=number))
        bundle = patched
    return records


def choose_attempt(records: list[AttemptRecord], primary: str) -> AttemptRecord | None:
    """The validated attempt with the best validation score, else the best trained one; never by test."""
    trained = [r for r in records if r.validation is not None and r.validation.trained]
    pool = [r for r in trained if r.validation.ok] or trained
    best: AttemptRecord | None = None
    for record in pool:
        score = record.validation.val_score
        if best is None or (score is not None and (best.validation.val_score is None
                                                   or better(primary, score, best.validation.val_score))):
            best = record
    return best


def _evaluate(rd: RunDir, test_eval: Evaluator, primary: str) -> dict[str, Any]:
    model = test_eval.score(rd.predictions)
    baselines = {name: test_eval.score(pred) for name, pred in run_baselines(rd.split, "test").items()}
    return {
        "primary_metric": primary,
        "model": model.summary,
        "model_normalized": model.normalized,
        "baselines": {name: rep.summary for name, rep in baselines.items()},
        "ceiling": model.ceiling,
        "n_test_conditions": model.n_conditions,
        "per_condition": model.per_condition,
    }


def run_design(settings: DesignSettings, llm_config: LLMConfig | None = None, *,
               replay_from: Path | None = None, on_progress: ProgressCallback | None = None,
               handlers: dict[str, Any] | None = None) -> DesignResult:
    """Run the whole pipeline into `settings.out`; never raises for a model that fails to train
    (status `failed`), raises `PipelineError` / data and LLM errors for what stops the run itself.
    `handlers` replaces the offline backend's rules (default: `pipeline_handlers()`)."""
    emit = on_progress or (lambda event: None)
    started = time.monotonic()
    deadline = started + settings.max_minutes * 60
    rd = RunDir(settings.out).create()
    if rd.plan.exists() or rd.attempts.exists():
        raise PipelineError(f"{rd.root} already holds a run; choose a new --out directory")
    config = llm_config or LLMConfig()
    rd.write_json(rd.run_json, {"settings": json.loads(settings.model_dump_json()),
                                "llm": {"backend": config.backend, "model": config.model, "base_url": config.base_url},
                                "replay_of": str(replay_from) if replay_from else None})
    llm = make_backend(config, handlers or pipeline_handlers(), rd.root, replay_from=replay_from)

    emit(ProgressEvent("profile", f"profiling {settings.data}"))
    profile = profile_dataset(settings.data)
    rd.write_json(rd.profile, profile.model_dump(mode="json"))

    emit(ProgressEvent("analysis", "framing the task"))
    analysis = analyse_task(profile, settings.task, llm)
    rd.write_json(rd.task_analysis, analysis.model_dump(mode="json"))

    emit(ProgressEvent("discussion", "experts discussing", round=1))
    discussion = run_discussion(analysis, profile, llm, rd.root, max_rounds=settings.max_rounds,
                                on_event=_discussion_progress(emit))
    plan = _with_seed(discussion.plan, settings.seed)
    rd.plan.write_text(plan.model_dump_json(indent=1) + "\n")

    n_genes = plan.preprocessing.n_hvg if settings.max_genes is None else min(plan.preprocessing.n_hvg,
                                                                             settings.max_genes)
    emit(ProgressEvent("split", f"{analysis.split_scheme} split, seed {settings.seed}, {n_genes} genes"))
    make_split(settings.data, analysis.split_scheme, settings.seed, rd.split,
               n_genes=n_genes if n_genes < profile.n_genes else None, context=settings.held_out_context,
               on_progress=lambda msg: emit(ProgressEvent("split", msg)))
    val_eval, test_eval = Evaluator(rd.split, "val"), Evaluator(rd.split, "test")

    primary = plan.evaluation.primary_metric
    rd.prepare_sandbox_data()
    records: list[AttemptRecord] = []
    candidates = candidate_plans(plan, settings.candidates)
    for index, (label, candidate) in enumerate(candidates, 1):
        emit(ProgressEvent("codegen", f"candidate {index}/{len(candidates)} ({label}): "
                                      f"{candidate.architecture.perturbation_encoder} encoder, "
                                      f"base {candidate.architecture.base_predictor}"))
        generated = llm.ask(codegen_request(json.loads(candidate.model_dump_json()), render_bundle(candidate)))
        records += _run_attempts(rd, Bundle(files=dict(generated.files)), llm, settings, deadline, val_eval,
                                 test_eval, primary, emit, first=len(records) + 1, candidate=index)
    if len(candidates) > 1:
        rd.write_json(rd.root / "candidates.json", [
            {"candidate": i, "label": label, "plan": json.loads(p.model_dump_json()),
             "attempts": [r.number for r in records if r.candidate == i],
             "val_scores": [r.validation.val_score for r in records if r.candidate == i and r.validation]}
            for i, (label, p) in enumerate(candidates, 1)])

    best = choose_attempt(records, primary)
    chosen = best.number if best else None
    status: Status = "failed"
    metrics: dict[str, Any] = {"primary_metric": primary}
    if best is not None:
        if best.candidate != 1:  # plan.json describes the code that was kept
            rd.plan.write_text(candidates[best.candidate - 1][1].model_dump_json(indent=1) + "\n")
        chosen_dir = rd.attempt(chosen)
        if rd.code.exists():
            shutil.rmtree(rd.code)
        shutil.copytree(chosen_dir / "code", rd.code)
        for name in FINAL_OUTPUTS:
            shutil.copy2(chosen_dir / "out" / name, rd.root / name)
        validation = best.validation
        status = "validated" if validation.ok else "below_baseline"
        emit(ProgressEvent("evaluate", "scoring test predictions and baselines"))
        metrics = _evaluate(rd, test_eval, primary)
        metrics["val"] = {"score": validation.val_score, "mean_baseline": validation.mean_baseline_score,
                          "summary": validation.val_summary}
    else:
        # Nothing trained: code/ still shows the last code that was tried.
        last = rd.attempts / f"{len(records):02d}" / "code"
        if last.exists():
            shutil.copytree(last, rd.code, dirs_exist_ok=True)
    metrics.update({"status": status, "chosen_attempt": chosen, "attempts": len(records),
                    "chosen_candidate": best.candidate if best else None, "candidates": len(candidates),
                    "seconds": round(time.monotonic() - started, 1),
                    "llm_usage": summarize_run(rd.root).model_dump(mode="json")})
    rd.write_json(rd.metrics, metrics)
    emit(ProgressEvent("report", "writing report.html"))
    write_report(rd, plan, analysis, discussion, metrics, records)
    emit(ProgressEvent("done", f"{status}: {rd.root}"))
    return DesignResult(rd.root, status, metrics, records)
