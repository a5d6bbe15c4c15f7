"""The job kinds the server runs, by name."""

from __future__ import annotations

from typing import Any

from .design import run_design_job
from .regression import run_pytest, run_replay, run_rescore
from .runner import JobContext, JobKind

REGRESSION_KINDS = ("regression.pytest", "regression.rescore", "regression.replay")


def job_kinds(pool: Any) -> dict[str, JobKind]:
    """Regression runs are idempotent, so a restarted server runs them again from the start; a design
    run cannot resume mid-pipeline and ends as interrupted."""

    async def pytest_job(ctx: JobContext) -> dict[str, Any]:
        return await run_pytest(ctx, pool)

    return {
        "design": JobKind(run_design_job, resumable=False),
        "regression.pytest": JobKind(pytest_job, resumable=True),
        "regression.rescore": JobKind(run_rescore, resumable=True),
        "regression.replay": JobKind(run_replay, resumable=False),
    }
