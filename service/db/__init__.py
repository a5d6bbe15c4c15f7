"""Persistence in one place: the engine (`Database`), every table, and the Alembic migrations.

Both `service.api` and `service.jobs` build on it; it imports neither.
"""

from .database import Database, default_db_url
from .tables import FINAL_STATES, JOB_STATES, AuditRow, Base, DatasetRow, JobEventRow, JobRow, SandboxRow, TenantRow

__all__ = [
    "FINAL_STATES",
    "JOB_STATES",
    "AuditRow",
    "Base",
    "Database",
    "DatasetRow",
    "JobEventRow",
    "JobRow",
    "SandboxRow",
    "TenantRow",
    "default_db_url",
]
