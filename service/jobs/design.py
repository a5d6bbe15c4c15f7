"""The design job: `service.pipeline.run_design` in a worker thread, its progress as job events, its run
directory's outputs as downloadable artifacts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sandbox import SandboxProvider
from service.protocol import DesignOptions

from .runner import JobContext, JobFailed

# Options a tenant may set; everything else about the run (paths, sandbox backend) is the server's.
# The runtime is not among them: the server decides it from the tenant's (params["runtime"]).
DESIGN_OPTIONS = tuple(name for name in DesignOptions.model_fields if name != "runtime")
ARTIFACT_FILES = ("model.pt", "predictions.h5ad", "val_predictions.h5ad", "report.html", "metrics.json",
                  "plan.json", "llm_calls.jsonl", "train_log.jsonl", "task_analysis.json", "search.json")


class _Stop(BaseException):
    """Unwinds the pipeline thread at its next progress report after a cancel; a BaseException so the
    pipeline's own `except Exception` handlers (which retry or record failures) let it through."""


def progress_bridge(ctx: JobContext):
    """An `on_progress` callback for run_design: events into the store, phases onto the job row, and a
    cancellation point at every report. A report repeating the last one (a wait for sandbox room, reported
    each second) is recorded once."""
    last_phase: list[str | None] = [None]
    last_event: list[Any] = [None]

    def on_progress(event: Any) -> None:
        if ctx.cancelled.is_set():
            raise _Stop()
        if event == last_event[0]:
            return
        last_event[0] = event
        if event.phase != last_phase[0]:
            if last_phase[0] is not None:
                ctx.checkpoint(last_phase[0])
            last_phase[0] = event.phase
            ctx.set_phase(event.phase)
        # Messages may name server paths: the job's recorder redacts every event (see `Redactor`).
        ctx.emit("progress", phase=event.phase, message=event.message or None, round=event.round,
                 attempt=event.attempt, epoch=event.epoch, train_loss=event.train_loss, val_loss=event.val_loss)

    return on_progress


def design_settings(params: dict[str, Any], out: Path, tenant: str | None = None) -> Any:
    """The run's settings: the tenant's options, and what the server decided (the runtime its sandboxes run
    under, `params["runtime"]`; the tenant whose label they carry)."""
    from service.pipeline import DesignSettings

    return DesignSettings.model_validate({
        "data": params["dataset_path"], "task": params["task"], "out": str(out), "sandbox": "docker",
        **{k: v for k, v in (params.get("options") or {}).items() if k in DESIGN_OPTIONS},
        "runtime": params.get("runtime"), "tenant": tenant,
    })


async def run_design_job(ctx: JobContext, provider: SandboxProvider) -> dict[str, Any]:
    """params: dataset_path, task, options (see DESIGN_OPTIONS), runtime. Sandboxes come from `provider` (the
    server's, for the job's tenant)."""
    from service.llm import LLMConfig
    from service.pipeline import run_design

    run_dir = ctx.work_dir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a previous attempt's leftovers: run_design refuses a used folder
    settings = design_settings(ctx.job.params, run_dir, ctx.job.tenant_id)
    bridge = progress_bridge(ctx)
    try:
        result = await ctx.run_blocking(run_design, settings, LLMConfig.resolve(), on_progress=bridge,
                                        provider=provider)
    except _Stop:
        ctx.check_cancelled()
        raise
    ctx.check_cancelled()
    collect_artifacts(run_dir, ctx.artifacts_dir)
    if result.status == "failed":
        raise JobFailed(f"no attempt trained a model in {len(result.attempts)} attempt(s); see the job's events "
                        "and report.html")
    keep = ("status", "primary_metric", "model", "model_normalized", "baselines", "ceiling", "n_test_conditions",
            "val", "verdict", "delivered", "search", "chosen_attempt", "attempts", "seconds")
    return {"status": result.status, "metrics": {k: result.metrics[k] for k in keep if k in result.metrics}}


def collect_artifacts(run_dir: Path, artifacts: Path) -> None:
    """The run's downloadable outputs: the code bundle as a zip, weights, predictions, report, metrics."""
    artifacts.mkdir(parents=True, exist_ok=True)
    if (run_dir / "code").is_dir():
        shutil.make_archive(str(artifacts / "code"), "zip", run_dir / "code")
    for name in ARTIFACT_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, artifacts / name)
