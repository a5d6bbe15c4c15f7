"""The audit log: who did what, when, with which outcome. Entries are batched so a call never waits on a write."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from service.jobs.db import Database

from .records import AuditRow

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, db: Database, flush_every: float = 0.25) -> None:
        self.db = db
        self.flush_every = flush_every
        self._pending: list[AuditRow] = []
        self._task: asyncio.Task[None] | None = None

    def record(self, tenant_id: str | None, transport: str, action: str, resource: str | None, outcome: str,
               detail: str | None = None) -> None:
        self._pending.append(AuditRow(
            ts=time.time(), tenant_id=tenant_id, transport=transport, action=action,
            resource=(resource or None) and resource[:256], outcome=outcome, detail=detail and detail[:2000],
        ))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="audit-flush")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.db.run(self.flush)

    def flush(self) -> None:
        rows, self._pending = self._pending, []
        if not rows:
            return
        try:
            with self.db.session() as s:
                s.add_all(rows)
        except Exception:  # noqa: BLE001 - losing audit rows must not take the API down; say so loudly
            log.exception("could not write %d audit log entries", len(rows))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_every)
            await self.db.run(self.flush)
