"""The API's tables: tenants (with hashed keys and quotas), the audit log, uploaded datasets, sandboxes."""

from __future__ import annotations

import time

from sqlalchemy import JSON, Float, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from service.jobs.db import Base


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
    # Added after the first release: server defaults fill them in for tenants created before.
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
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    layout: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class SandboxRow(Base):
    """A sandbox's record; the live object is in the server's memory and dies with the server."""

    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    spec: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="live")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    closed_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
