"""Every table of the service, in one metadata: tenants (hashed keys and quotas), the audit log,
uploaded datasets, sandboxes, jobs and their events.

Timestamps are epoch seconds (floats): portable across SQLite and PostgreSQL without timezone games.
A change here needs a migration (`service/db/migrations/versions`); `tests/db/test_migrations.py`
fails while the two disagree.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class TenantRow(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # The key is `cf_<key_id>_<secret>`; only sha256(secret) is kept, looked up by key_id.
    key_id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    max_sandboxes: Mapped[int] = mapped_column(Integer, default=4)
    max_jobs: Mapped[int] = mapped_column(Integer, default=2)
    max_gpus: Mapped[int] = mapped_column(Integer, default=0)
    max_memory: Mapped[str] = mapped_column(String(16), default="8g")
    rate_limit: Mapped[float] = mapped_column(Float, default=50.0)
    # Added after the first release (migration 0002): server defaults fill them in for older tenants.
    max_cpus: Mapped[float] = mapped_column(Float, default=8.0, server_default=text("8"))
    max_storage: Mapped[str] = mapped_column(String(16), default="20g", server_default="20g")
    runtime: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, default=time.time, index=True)
    tenant_id: Mapped[str | None] = mapped_column(String(40), index=True, nullable=True)
    transport: Mapped[str] = mapped_column(String(8))
    action: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str | None] = mapped_column(String(256), nullable=True)
    outcome: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(256))
    path: Mapped[str] = mapped_column(Text)  # a host path: never shown to the tenant
    size_bytes: Mapped[int] = mapped_column(Integer)
    layout: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class SandboxRow(Base):
    """A sandbox's record. On one machine the live object is in the server's memory and dies with the
    server; on a Ray cluster it is a named actor any API replica can reach (`owner`: the replica that
    created it)."""

    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="live")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    closed_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)  # migration 0003


JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class JobRow(Base):
    """One unit of queued work: a design job or a regression run. The queue is the `queued` rows."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    phase: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The last phase that finished: a restarted server resumes after it when the job kind can.
    checkpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The replica running it and when that replica last said it still does (migration 0003): a running
    # job whose heartbeat is stale lost its replica and is requeued or failed by another.
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobEventRow(Base):
    """One event of a job (phase, round, attempt, epoch, metric, log line), in order."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    ts: Mapped[float] = mapped_column(Float, default=time.time)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
