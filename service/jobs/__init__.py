"""Durable jobs: the store (SQLAlchemy; the queue is in the database), the runner, and the job kinds
(design runs and regression runs)."""

from typing import Any

from .db import FINAL_STATES, JOB_STATES, Base, Database, default_db_url
from .design import DESIGN_OPTIONS, design_settings, run_design_job
from .regression import compare_metrics, parse_junit, run_pytest, run_replay, run_rescore
from .runner import JobCancelled, JobContext, JobFailed, JobKind, JobRunner
from .store import INTERRUPTED, Job, JobEvent, JobStore

REGRESSION_KINDS = ("regression.pytest", "regression.rescore", "regression.replay")


def job_kinds(pool: Any) -> dict[str, JobKind]:
    """Every job kind the server runs. Regression runs are idempotent, so a restarted server runs them
    again from the start; a design run cannot resume mid-pipeline and ends as interrupted."""

    async def pytest_job(ctx: JobContext) -> dict[str, Any]:
        return await run_pytest(ctx, pool)

    return {
        "design": JobKind(run_design_job, resumable=False),
        "regression.pytest": JobKind(pytest_job, resumable=True),
        "regression.rescore": JobKind(run_rescore, resumable=True),
        "regression.replay": JobKind(run_replay, resumable=False),
    }


__all__ = [
    "DESIGN_OPTIONS",
    "FINAL_STATES",
    "INTERRUPTED",
    "JOB_STATES",
    "REGRESSION_KINDS",
    "Base",
    "Database",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobEvent",
    "JobFailed",
    "JobKind",
    "JobRunner",
    "JobStore",
    "compare_metrics",
    "default_db_url",
    "design_settings",
    "job_kinds",
    "parse_junit",
    "run_design_job",
    "run_pytest",
    "run_replay",
    "run_rescore",
]
