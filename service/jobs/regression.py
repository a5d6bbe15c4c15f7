"""Regression runs other tools gate their CI on.

- `pytest`: a code bundle's test suite run in a fresh sandbox (data mounted read-only at /data),
  per-test results as JSON and as pytest's own JUnit XML.
- `rescore`: a stored design run's predictions scored again by the evaluator on its split, and
  compared with the metrics recorded when it ran.
- `replay`: a stored design run re-run with its recorded LLM replies and seed, its new metrics
  compared with the recorded ones.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from sandbox import CapacityError, Mount, SandboxProvider, SandboxSpec
from sandbox.errors import SandboxError

from .runner import JobContext, JobFailed

JUNIT_MAX_BYTES = 32 << 20
DEFAULT_TOLERANCE = {"rescore": 1e-9, "replay": 1e-6}
_releasing: set[asyncio.Future] = set()  # sandboxes being given back after a cancel (held so they are not GC'd)


def parse_junit(xml: bytes) -> dict[str, Any]:
    """Per-test outcomes and totals from a pytest JUnit XML report."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise JobFailed(f"pytest's JUnit report is not valid XML ({exc})") from None
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for child, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            found = case.find(child)
            if found is not None:
                outcome, message = name, (found.get("message") or (found.text or "")[:2000]) or None
                break
        tests.append({"name": case.get("name"), "classname": case.get("classname"), "outcome": outcome,
                      "time": float(case.get("time") or 0.0), "message": message})
    counts = {k: sum(1 for t in tests if t["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    return {"summary": {"total": len(tests), **counts}, "tests": tests}


async def run_pytest(ctx: JobContext, provider: SandboxProvider) -> dict[str, Any]:
    """params: bundle_dir (host folder with the code), data_dir (host folder or None), timeout, memory, cpus,
    runtime (the container runtime; None: the engine's default). The sandbox is leased from `provider` (the
    server's, within the tenant's quota: while it is full the job waits, up to its timeout)."""
    params = ctx.job.params
    mounts = [Mount(source=params["data_dir"], target="/data")] if params.get("data_dir") else []
    spec = SandboxSpec(memory=params.get("memory", "2g"), cpus=params.get("cpus", 1.0), mounts=mounts,
                       timeout=params.get("timeout", 600.0), labels={"tenant": ctx.job.tenant_id},
                       runtime=params.get("runtime"))
    ctx.phase("sandbox", "starting a sandbox")
    try:
        async with await _lease(ctx, provider, spec, params.get("timeout", 600.0)) as sb:
            ctx.phase("upload", "copying the bundle")
            files = await sb.files.put_dir(params["bundle_dir"], "bundle")
            ctx.emit("log", message=f"{len(files)} files copied")
            ctx.phase("pytest", "running the suite")
            res = await sb.commands.run(
                ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml=/workspace/junit.xml"],
                cwd="/workspace/bundle", timeout=params.get("timeout", 600.0),
                on_event=lambda ev: ctx.emit("output", stream=ev.kind, text=getattr(ev, "text", None)),
            )
            if res.outcome.value not in ("ok", "error"):
                raise JobFailed(f"the test run ended {res.outcome.value}: {res.died_cause or res.evalue or ''}".strip())
            try:
                xml = await sb.files.get("junit.xml", max_bytes=JUNIT_MAX_BYTES)
            except SandboxError:
                raise JobFailed(f"pytest wrote no JUnit report (exit code {res.exit_code}); "
                                f"its output ended with: {res.stdout[-1000:]}{res.stderr[-1000:]}") from None
    except SandboxError as exc:
        raise JobFailed(f"sandbox error: {exc}") from None
    report = parse_junit(xml)
    exit_code = res.exit_code if res.exit_code is not None else 0
    # pytest exits 5 when it collected nothing: that is not a passing suite.
    passed = exit_code == 0 and report["summary"]["total"] > 0
    result = {"passed": passed, "exit_code": exit_code, **report}
    (ctx.artifacts_dir / "junit.xml").write_bytes(xml)
    (ctx.artifacts_dir / "results.json").write_text(json.dumps(result, indent=1))
    ctx.emit("metrics", **report["summary"])
    return result


async def _lease(ctx: JobContext, provider: SandboxProvider, spec: SandboxSpec, wait: float) -> Any:
    """A sandbox from the provider, waiting up to `wait` seconds for room in the tenant's quota (reported once,
    cancellable); then JobFailed naming the quota."""
    deadline, reported = time.monotonic() + wait, False
    while True:
        try:
            return await _acquire(provider, spec)
        except CapacityError as exc:
            if time.monotonic() + exc.retry_after > deadline:
                raise JobFailed(f"no room for the job's sandbox within {wait:g} s: {exc}") from None
            if not reported:
                ctx.emit("log", message=f"waiting for room for a sandbox: {exc}")
                reported = True
            ctx.check_cancelled()
            await asyncio.sleep(min(exc.retry_after, 1.0))


async def _acquire(provider: SandboxProvider, spec: SandboxSpec) -> Any:
    """A sandbox from the provider. A cancel while it starts lets the start finish and then releases it:
    cancelling a half-made container would leave it behind."""
    start = asyncio.ensure_future(provider.lease(spec))
    try:
        return await asyncio.shield(start)
    except asyncio.CancelledError:
        def release(task: asyncio.Future) -> None:
            if not task.cancelled() and task.exception() is None:
                closing = asyncio.ensure_future(task.result().close())
                _releasing.add(closing)
                closing.add_done_callback(_releasing.discard)

        start.add_done_callback(release)
        raise


def compare_metrics(recorded: dict[str, Any], now: dict[str, Any], tolerances: dict[str, float],
                    default: float) -> dict[str, Any]:
    """Metric-by-metric differences; a metric passes when |now - recorded| <= its tolerance."""
    differences = []
    for name in sorted(set(recorded) | set(now)):
        old, new = recorded.get(name), now.get(name)
        tol = float(tolerances.get(name, default))
        if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
            ok = old == new
            diff = None
        elif math.isnan(old) and math.isnan(new):
            ok, diff = True, 0.0
        else:
            diff = abs(float(new) - float(old))
            ok = diff <= tol
        differences.append({"metric": name, "recorded": old, "now": new, "difference": diff, "tolerance": tol,
                            "ok": ok})
    return {"passed": all(d["ok"] for d in differences), "differences": differences,
            "failed_metrics": [d["metric"] for d in differences if not d["ok"]]}


def _recorded_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise JobFailed(f"the stored run has no metrics.json to compare with ({run_dir.name})")
    metrics = json.loads(path.read_text())
    if not isinstance(metrics.get("model"), dict):
        raise JobFailed("the stored run recorded no model metrics (its design run did not train a model)")
    return metrics


async def run_rescore(ctx: JobContext) -> dict[str, Any]:
    """params: run_dir (a stored design run), tolerances, default_tolerance."""
    params = ctx.job.params
    run_dir = Path(params["run_dir"])
    recorded = _recorded_metrics(run_dir)
    ctx.phase("evaluate", "scoring the stored predictions")
    from service.data.evaluate import PredictionsError, evaluate

    try:
        report = await ctx.run_blocking(evaluate, run_dir / "split", run_dir / "predictions.h5ad", "test")
    except PredictionsError as exc:
        raise JobFailed(f"the stored predictions cannot be scored: {exc}") from None
    # predictions.h5ad is the delivered predictor's (the designed model, a baseline or their stack).
    delivered = (recorded.get("delivered") or {}).get("test") or recorded["model"]
    comparison = compare_metrics(delivered, report.summary, params.get("tolerances") or {},
                                 params.get("default_tolerance", DEFAULT_TOLERANCE["rescore"]))
    ctx.emit("metrics", **{k: v for k, v in report.summary.items() if isinstance(v, (int, float))})
    (ctx.artifacts_dir / "comparison.json").write_text(json.dumps(comparison, indent=1))
    return {"source_job_id": params["source_job_id"], **comparison}


async def run_replay(ctx: JobContext, provider: SandboxProvider) -> dict[str, Any]:
    """params: run_dir (a stored design run), tolerances, default_tolerance, sandbox (memory, cpus within the
    tenant's limits and the tenant's runtime, in place of the recorded ones). Re-runs it with replayed LLM
    calls."""
    from service.pipeline import DesignSettings, run_design

    params = ctx.job.params
    run_dir = Path(params["run_dir"])
    recorded = _recorded_metrics(run_dir)
    settings_data = json.loads((run_dir / "run.json").read_text())["settings"]
    out = ctx.work_dir / "replay"
    settings = DesignSettings.model_validate({**settings_data, **params.get("sandbox", {}), "out": str(out),
                                              "tenant": ctx.job.tenant_id})
    ctx.phase("replay", "re-running the design with recorded LLM replies")
    from .design import progress_bridge

    result = await ctx.run_blocking(run_design, settings, replay_from=run_dir, on_progress=progress_bridge(ctx),
                                    provider=provider)
    comparison = compare_metrics(recorded["model"], result.metrics.get("model") or {},
                                 params.get("tolerances") or {},
                                 params.get("default_tolerance", DEFAULT_TOLERANCE["replay"]))
    (ctx.artifacts_dir / "comparison.json").write_text(json.dumps(comparison, indent=1))
    return {"source_job_id": params["source_job_id"], "status": result.status, **comparison}
