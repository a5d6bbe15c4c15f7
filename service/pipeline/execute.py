"""One run in a sandbox: put the bundle in, run its tests, train, fetch the outputs.

The sandbox sees the bundle and `/data` (read-only: train, val_inputs, test_inputs — no truth) and an
empty environment. Every step's output is written under the run's folder.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from sandbox import (DEFAULT_CPU_IMAGE, DEFAULT_GPU_IMAGE, BackendKind, BackendProvider, ExecutionResult, Mount,
                     SandboxError, SandboxProvider, SandboxSpec)
from sandbox.escapes import strip_escapes
from service.pipeline.codegen import CONTRACT_TESTS, EXTRA_TESTS
from service.pipeline.progress import ProgressCallback, ProgressEvent, epoch_event

Stage = Literal["sandbox", "pytest", "train", "fetch"]
OUTPUT_FILES = ("predictions.h5ad", "val_predictions.h5ad", "model.pt", "val_metrics.json", "train_log.jsonl")


@dataclass(frozen=True)
class SandboxSettings:
    backend: BackendKind = BackendKind.DOCKER
    image: str | None = None  # default: the CPU image, or the GPU image when gpus > 0
    gpus: int = 0
    cpus: float = 2.0
    memory: str = "4g"
    workspace_quota: str = "2g"
    runtime: str | None = None  # container runtime of the docker sandbox (runsc: gVisor); None: the engine's
    tenant: str | None = None  # a service job's tenant: labels its containers as the API labels its sandboxes
    # Where the sandboxes come from: the run's one provider (the server's, for a job); None: a provider for the
    # attempt alone (a single run_attempt call).
    provider: SandboxProvider | None = field(default=None, compare=False, repr=False)

    def spec(self, data_dir: Path, timeout: float) -> SandboxSpec:
        image = self.image or (DEFAULT_GPU_IMAGE if self.gpus else DEFAULT_CPU_IMAGE)
        # Thread pools sized to the CPU quota: torch and BLAS otherwise start one thread per host core and
        # stall each other against the quota (twice as slow on a busy host).
        threads = str(max(1, math.ceil(self.cpus)))
        return SandboxSpec(
            image=image, cpus=self.cpus, memory=self.memory, gpus=self.gpus or None, timeout=timeout,
            tmpfs_size="512m", workspace_quota=self.workspace_quota, pids_limit=512,
            mounts=[Mount(source=str(data_dir.resolve()), target="/data", read_only=True)],
            env={name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
            labels={"role": "design", **({"tenant": self.tenant} if self.tenant else {})},
            runtime=None if self.backend is BackendKind.LOCAL else self.runtime,
        )


@dataclass
class StepFailure:
    """What went wrong in one stage, as the debugging agent reads it."""

    stage: Stage
    outcome: str
    ename: str | None = None
    evalue: str | None = None
    traceback: list[str] = field(default_factory=list)
    died_cause: str | None = None
    output_tail: str = ""

    def summary(self) -> str:
        what = self.died_cause or f"{self.ename or self.outcome}: {self.evalue or ''}".strip()
        cause = _exception_line(self.output_tail) if self.ename == "CommandFailed" else None
        return f"{self.stage} failed ({self.outcome}): {what}" + (f" — {cause}" if cause else "")


_EXCEPTION_LINE = re.compile(r"^(?:E\s+)?(\w+(?:Error|Exception|Exit)\b:?.*)$")


def _exception_line(output: str) -> str | None:
    """The last exception a command's output names (pytest's `E   AttributeError: ...`, a traceback's last
    line): a command's exit code alone does not tell the debugger or the user what broke."""
    for line in reversed(output.splitlines()):
        found = _EXCEPTION_LINE.match(line.strip())
        if found:
            return found.group(1)[:300]
    return None


@dataclass
class AttemptOutcome:
    out_dir: Path
    data_listing: list[str]
    seconds: float
    failure: StepFailure | None = None
    # The sandbox it ran in (its backend's id: with the Ray backend, actor `sandbox-<id>` on some node).
    sandbox: str | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        return out


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _failure(stage: Stage, res: ExecutionResult) -> StepFailure:
    # What the debugger reads: colour codes and other terminal controls are noise to it (and tokens).
    output = strip_escapes((res.stdout or "") + ("\n" + res.stderr if res.stderr else ""))
    return StepFailure(stage=stage, outcome=res.outcome.value, ename=res.ename,
                       evalue=strip_escapes(res.evalue) if res.evalue else res.evalue,
                       traceback=[strip_escapes(line) for line in res.traceback or []],
                       died_cause=res.died_cause, output_tail=_tail(output))


def _log(path: Path, res: ExecutionResult) -> None:
    path.write_text(strip_escapes((res.stdout or "") + ("\n--- stderr ---\n" + res.stderr if res.stderr else "")))


def _test_runs(code_dir: Path) -> list[list[str]]:
    """The pytest commands of a bundle: the service's contract tests alone first (the model's own tests,
    in a process of their own, cannot deselect or patch them), then the model's, when it wrote some."""
    pytest = ["python", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--color=no"]
    return [pytest + [name] for name in (CONTRACT_TESTS, EXTRA_TESTS) if (code_dir / name).is_file()]


def run_attempt(code_dir: Path, data_dir: Path, attempt_dir: Path, attempt: int, settings: SandboxSettings,
                time_left: float, on_progress: ProgressCallback, run_tests: bool = True) -> AttemptOutcome:
    """Run tests (unless `run_tests` is false: the same code already passed them) then training of the
    bundle in `code_dir` in a fresh sandbox; outputs land in `attempt_dir/out`. A failure is returned
    (never raised) so the debugging agent can read it."""
    started = time.monotonic()
    out_dir = attempt_dir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    remaining = lambda: max(5.0, time_left - (time.monotonic() - started))  # noqa: E731
    on_progress(ProgressEvent("sandbox", f"starting a {settings.backend} sandbox", attempt=attempt))
    own_provider = BackendProvider(settings.backend) if settings.provider is None else None
    provider = settings.provider or own_provider
    assert provider is not None

    def waiting(why: str) -> None:
        # Repeated while the tenant's quota is full (a job's progress bridge records it once); each call is
        # also where a cancelled job stops.
        on_progress(ProgressEvent("sandbox", f"waiting for room for a sandbox: {why}", attempt=attempt))

    try:
        sb = provider.lease_blocking(settings.spec(data_dir, timeout=remaining()), wait=remaining() - 5.0,
                                     on_wait=waiting)
    except SandboxError as exc:
        if own_provider is not None:
            own_provider.close()
        failure = StepFailure(stage="sandbox", outcome="error", ename=type(exc).__name__, evalue=str(exc))
        return AttemptOutcome(out_dir, [], time.monotonic() - started, failure)
    outcome = functools.partial(AttemptOutcome, sandbox=sb.id)  # each outcome names its sandbox
    try:
        listing = sb.commands.run(["ls", "-1", sb.data_root], timeout=30)
        data_listing = sorted((listing.stdout or "").split())
        workspace = sb.workspace
        sb.files.put_dir(code_dir, "code")
        for command in _test_runs(code_dir) if run_tests else []:
            on_progress(ProgressEvent("pytest", f"running {command[-1]}", attempt=attempt))
            res = sb.commands.run(command, cwd=f"{workspace}/code", timeout=remaining())
            log_name = "pytest.log" if command[-1] == CONTRACT_TESTS else "pytest_extra.log"
            _log(attempt_dir / log_name, res)
            if res.outcome != "ok":
                return outcome(out_dir, data_listing, time.monotonic() - started, _failure("pytest", res))

        on_progress(ProgressEvent("train", "training", attempt=attempt))

        def on_event(event) -> None:
            for line in (getattr(event, "text", "") or "").splitlines():
                progress = epoch_event(line, attempt)
                if progress is not None:
                    on_progress(progress)

        res = sb.commands.run(["python", "train.py", "--data", sb.data_root, "--out", f"{workspace}/out",
                              "--config", "config.json"], cwd=f"{workspace}/code", timeout=remaining(),
                             on_event=on_event)
        _log(attempt_dir / "train.log", res)
        # Whatever training wrote is kept, even after a failure, for the diagnosis.
        try:
            sb.files.get_dir("out", out_dir)
        except SandboxError as exc:
            if res.outcome == "ok":
                failure = StepFailure(stage="fetch", outcome="error", ename=type(exc).__name__, evalue=str(exc))
                return outcome(out_dir, data_listing, time.monotonic() - started, failure)
        failure = None if res.outcome == "ok" else _failure("train", res)
        return outcome(out_dir, data_listing, time.monotonic() - started, failure)
    finally:
        sb.close()
        if own_provider is not None:
            own_provider.close()


def save_outcome(attempt_dir: Path, outcome: AttemptOutcome) -> None:
    (attempt_dir / "outcome.json").write_text(json.dumps(outcome.to_json(), indent=1, default=str))
