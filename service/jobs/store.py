"""The durable job store: jobs and their events in the database, the queue being the `queued` rows.

Every state change is committed before it is acted on, so a server killed at any point finds, on
restart, exactly which jobs waited, which ran (and from which finished phase), and which ended.
"""

from __future__ import annotations

import builtins
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from tenacity import before_sleep_log, retry, retry_if_exception_type, stop_after_delay, wait_exponential

from service.db import FINAL_STATES, Database, JobEventRow, JobRow

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted by restart"
# A running job whose replica has not said "still running" for this long lost its replica (killed, or
# cut off from the database): another replica requeues or fails it. Replicas beat every few seconds.
JOB_LEASE_S = 30.0
# How long a write of the job machinery is retried (locked or unreachable database) before it gives up.
WRITE_RETRY_S = 10.0
# The writes the runner depends on; each is tried again with backoff when it fails for a passing
# reason (SQLite locked, connection lost).
_RETRIED_WRITES = ("claim_next", "record", "finish", "request_cancel", "heartbeat", "requeue")


@dataclass(frozen=True)
class Job:
    """A detached snapshot of a job row."""

    id: str
    tenant_id: str
    kind: str
    status: str
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    phase: str | None
    checkpoint: str | None
    attempts: int
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATES

    @classmethod
    def from_row(cls, row: JobRow) -> Job:
        return cls(
            id=row.id, tenant_id=row.tenant_id, kind=row.kind, status=row.status, params=dict(row.params or {}),
            result=row.result, error=row.error, phase=row.phase, checkpoint=row.checkpoint, attempts=row.attempts,
            cancel_requested=bool(row.cancel_requested), created_at=row.created_at, started_at=row.started_at,
            finished_at=row.finished_at,
        )


@dataclass(frozen=True)
class JobEvent:
    seq: int
    ts: float
    kind: str
    data: dict[str, Any]


class JobStore:
    def __init__(self, db: Database, retry_for: float = WRITE_RETRY_S) -> None:
        self.db = db
        # Event numbers are max+1 per job: writers in this process take turns.
        self._event_lock = threading.Lock()
        retrying = retry(
            retry=retry_if_exception_type(OperationalError), wait=wait_exponential(multiplier=0.1, max=2.0),
            stop=stop_after_delay(retry_for), reraise=True, before_sleep=before_sleep_log(log, logging.WARNING),
        )
        for name in _RETRIED_WRITES:
            setattr(self, name, retrying(getattr(self, name)))

    def create(self, tenant_id: str, kind: str, params: dict[str, Any],
               admit: Callable[[Session], None] | None = None) -> Job:
        """Queue a job. `admit(session)` (the tenant's quotas) runs first in the same transaction,
        which then holds the write lock, so a quota check and the job it admits are one step."""
        row = JobRow(id="job_" + secrets.token_hex(8), tenant_id=tenant_id, kind=kind, status="queued",
                     params=params, created_at=time.time(), attempts=0, cancel_requested=0)
        with (self.db.serialized() if admit else self.db.session()) as s:
            if admit is not None:
                admit(s)
            s.add(row)
            s.flush()  # the job row before its first event (the foreign key)
            s.add(JobEventRow(job_id=row.id, seq=1, ts=time.time(), kind="status", data={"status": "queued"}))
        return Job.from_row(row)

    def get(self, job_id: str) -> Job | None:
        with self.db.session() as s:
            row = s.get(JobRow, job_id)
            return Job.from_row(row) if row is not None else None

    def list(self, tenant_id: str, kinds: tuple[str, ...] | None = None) -> list[Job]:
        query = select(JobRow).where(JobRow.tenant_id == tenant_id)
        if kinds:
            query = query.where(JobRow.kind.in_(kinds))
        with self.db.session() as s:
            return [Job.from_row(r) for r in s.scalars(query.order_by(JobRow.created_at))]

    def active_ids(self, tenant_id: str) -> builtins.list[str]:
        with self.db.session() as s:
            return list(s.scalars(select(JobRow.id).where(
                JobRow.tenant_id == tenant_id, JobRow.status.in_(("queued", "running")))))

    def queue_depth(self) -> tuple[int, int]:
        """(queued, running) over all tenants."""
        with self.db.session() as s:
            rows = dict(s.execute(select(JobRow.status, func.count()).where(
                JobRow.status.in_(("queued", "running"))).group_by(JobRow.status)).all())
        return rows.get("queued", 0), rows.get("running", 0)

    def claim_next(self, owner: str | None = None) -> Job | None:
        """Move the oldest queued job to `running`, held by replica `owner`, and return it; None when the
        queue is empty. The conditional update makes a claim atomic even with several workers or API
        replicas on one database (PostgreSQL: rows another claim has locked are skipped, not waited on)."""
        with self._event_lock, self.db.session() as s:
            candidates = s.scalars(select(JobRow.id).where(JobRow.status == "queued")
                                   .order_by(JobRow.created_at).limit(5)
                                   .with_for_update(skip_locked=True)).all()
            for job_id in candidates:
                now = time.time()
                claimed = _rowcount(s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                                              .values(status="running", started_at=now, owner=owner,
                                                      heartbeat_at=now, attempts=JobRow.attempts + 1)))
                if claimed:
                    row = s.get_one(JobRow, job_id)
                    s.refresh(row)
                    _append_event(s, job_id, "status", {"status": "running", "attempt": row.attempts})
                    return Job.from_row(row)
            return None

    def record(self, job_id: str, updates: builtins.list[tuple[str, Any]]) -> None:
        """A batch of a running job's progress, in order and in one transaction: ("event", (kind,
        data)), ("phase", name) or ("checkpoint", name)."""
        with self._event_lock, self.db.session() as s:
            for what, value in updates:
                if what == "event":
                    _append_event(s, job_id, *value)
                else:
                    s.execute(update(JobRow).where(JobRow.id == job_id).values({what: value}))

    def finish(self, job_id: str, status: str, result: dict[str, Any] | None = None, error: str | None = None,
               owner: str | None = None) -> Job:
        """The job's end. With `owner`, only while that replica still holds it: a replica that lost the job
        (its heartbeat went stale and another replica requeued it) does not overwrite what happened since."""
        with self._event_lock, self.db.session() as s:
            query = update(JobRow).where(JobRow.id == job_id)
            if owner is not None:
                query = query.where(JobRow.owner == owner, JobRow.status == "running")
            if _rowcount(s.execute(query.values(status=status, result=result, error=error, finished_at=time.time()))):
                _append_event(s, job_id, "status", {"status": status, **({"error": error} if error else {})})
            else:
                log.warning("job %s: not recorded as %s: replica %s no longer holds it", job_id, status, owner)
        job = self.get(job_id)
        assert job is not None
        return job

    def request_cancel(self, job_id: str, reason: str = "cancelled before it started") -> Job:
        """Queued jobs end at once; running ones are flagged for their worker to stop."""
        with self.db.session() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id).values(cancel_requested=1))
            cancelled_now = _rowcount(s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                                                .values(status="cancelled", error=reason, finished_at=time.time())))
        if cancelled_now:
            self.add_event(job_id, "status", {"status": "cancelled"})
        job = self.get(job_id)
        assert job is not None
        return job

    def requeue(self, job_id: str, owner: str | None, detail: str) -> bool:
        """A running job back in the queue (what ran it was lost), if `owner` still holds it."""
        with self._event_lock, self.db.session() as s:
            query = update(JobRow).where(JobRow.id == job_id, JobRow.status == "running")
            if owner is not None:
                query = query.where(JobRow.owner == owner)
            if not _rowcount(s.execute(query.values(status="queued", owner=None, heartbeat_at=None))):
                return False
            _append_event(s, job_id, "status", {"status": "queued", "detail": detail})
            return True

    def heartbeat(self, owner: str, job_ids: builtins.list[str]) -> builtins.list[str]:
        """Replica `owner` still runs `job_ids`; returns those of them whose cancel was asked for (through
        any replica: the database is where a cancel meets the replica running the job)."""
        if not job_ids:
            return []
        with self.db.session() as s:
            s.execute(update(JobRow).where(JobRow.id.in_(job_ids), JobRow.owner == owner, JobRow.status == "running")
                      .values(heartbeat_at=time.time()))
            return list(s.scalars(select(JobRow.id).where(JobRow.id.in_(job_ids), JobRow.cancel_requested == 1)))

    def recover_after_restart(self, resumable: set[str], owner: str | None = None,
                              stale_after: float | None = None) -> tuple[builtins.list[str], builtins.list[str]]:
        """Running jobs whose replica is gone: requeued when their kind can resume (from their
        checkpoint), otherwise failed with the reason. Gone means: held by `owner` (this replica, restarted:
        whatever it ran before died with its previous process) or by no one, or (with `stale_after`) not
        heartbeated for that many seconds. Every replica may run this at once: the rows are locked
        (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the write lock), so each job is recovered once.
        Returns (requeued ids, failed ids)."""
        requeued: builtins.list[tuple[str, str]] = []
        failed: builtins.list[tuple[str, str]] = []
        gone: ColumnElement[bool] = JobRow.owner.is_(None)
        if owner is not None:
            gone = gone | (JobRow.owner == owner)
        if stale_after is not None:
            gone = gone | (JobRow.heartbeat_at < time.time() - stale_after)
        with self.db.serialized() as s:
            for row in s.scalars(select(JobRow).where(JobRow.status == "running", gone)
                                 .with_for_update(skip_locked=True)):
                restarted = owner is not None and row.owner in (owner, None)
                why = (INTERRUPTED if restarted else
                       f"interrupted: its API replica {row.owner} stopped answering for over {stale_after:g} s")
                detail = ("requeued after a server restart" if restarted else
                          f"requeued: its API replica {row.owner} stopped answering")
                row.owner = row.heartbeat_at = None
                if row.kind in resumable and not row.cancel_requested:
                    row.status = "queued"
                    requeued.append((row.id, detail))
                else:
                    row.status, row.error, row.finished_at = "failed", why, time.time()
                    failed.append((row.id, why))
        for job_id, detail in requeued:
            self.add_event(job_id, "status", {"status": "queued", "detail": detail})
        for job_id, why in failed:
            self.add_event(job_id, "status", {"status": "failed", "error": why})
        return [j for j, _ in requeued], [j for j, _ in failed]

    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        self.record(job_id, [("event", (kind, data))])

    def events(self, job_id: str, after_seq: int = 0) -> builtins.list[JobEvent]:
        with self.db.session() as s:
            rows = s.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id, JobEventRow.seq > after_seq)
                             .order_by(JobEventRow.seq)).all()
            return [JobEvent(seq=r.seq, ts=r.ts, kind=r.kind, data=r.data) for r in rows]


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched (its result is a cursor result; the session's signature says only `Result`)."""
    return cast(CursorResult[Any], result).rowcount


def _append_event(s: Session, job_id: str, kind: str, data: dict[str, Any]) -> None:
    """The job's next event (numbers are max+1 per job: callers hold the store's event lock)."""
    seq = s.scalar(select(func.max(JobEventRow.seq)).where(JobEventRow.job_id == job_id)) or 0
    s.add(JobEventRow(job_id=job_id, seq=seq + 1, ts=time.time(), kind=kind, data=data))
