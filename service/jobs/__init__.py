"""Durable jobs: the store (SQLAlchemy; the queue is in the database), the runner, and the job kinds
(design runs and regression runs). The tables are `service.db`'s."""

from .kinds import REGRESSION_KINDS, job_kinds
from .design import DESIGN_OPTIONS, design_settings, run_design_job
from .regression import compare_metrics, parse_junit, run_pytest, run_replay, run_rescore
from .runner import JobCancelled, JobContext, JobFailed, JobKind, JobRunner
from .store import INTERRUPTED, Job, JobEvent, JobStore

__all__ = [
    "DESIGN_OPTIONS",
    "INTERRUPTED",
    "REGRESSION_KINDS",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobEvent",
    "JobFailed",
    "JobKind",
    "JobRunner",
    "JobStore",
    "compare_metrics",
    "design_settings",
    "job_kinds",
    "parse_junit",
    "run_design_job",
    "run_pytest",
    "run_replay",
    "run_rescore",
]
