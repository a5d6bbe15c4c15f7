"""Durable jobs: the store (SQLAlchemy; the queue is in the database), the runner, and the job kinds
(design runs and regression runs)."""

from .db import FINAL_STATES, JOB_STATES, Base, Database, default_db_url
from .kinds import REGRESSION_KINDS, job_kinds
from .design import DESIGN_OPTIONS, design_settings, run_design_job
from .regression import compare_metrics, parse_junit, run_pytest, run_replay, run_rescore
from .runner import JobCancelled, JobContext, JobFailed, JobKind, JobRunner
from .store import INTERRUPTED, Job, JobEvent, JobStore

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
