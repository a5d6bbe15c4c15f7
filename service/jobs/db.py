"""The service's database: one SQLAlchemy 2.0 engine (SQLite by default, PostgreSQL by URL) and the job tables.

Every table of the service derives from `Base`, so `Database.create_all()` makes the whole schema.
Timestamps are epoch seconds (floats): portable across SQLite and PostgreSQL without timezone games.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

T = TypeVar("T")
# Threads for database calls; a busy default executor (uploads, Docker calls) never delays them.
DB_THREADS = 8


class Base(DeclarativeBase):
    pass


def default_db_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / 'cellforge.db'}"


class Database:
    """An engine, a session factory and a bounded executor for calls from async code. SQLite runs in
    WAL mode so the CLI and the server can share it; `?timeout=S` in its URL sets how long a write
    waits for the lock (default 30 s)."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            connect_args = {"check_same_thread": False}
            if "timeout" not in make_url(url).query:
                connect_args["timeout"] = 30
            self.engine: Engine = create_engine(url, connect_args=connect_args)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=DB_THREADS)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._executor: ThreadPoolExecutor | None = None

    def create_all(self) -> None:
        """Create missing tables, and add columns that a newer version defined to existing ones."""
        # Importing the record modules registers their tables on `Base`.
        from service.api import records  # noqa: F401

        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def serialized(self) -> Iterator[Session]:
        """A transaction that holds the write lock from its first statement (SQLite: BEGIN IMMEDIATE).
        On PostgreSQL, callers lock the rows they decide on with `SELECT ... FOR UPDATE`."""
        with self._sessions() as session, session.begin():
            if self.engine.dialect.name == "sqlite":
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            yield session

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` (a blocking database call) on the database's own threads."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="cellforge-db")
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def dispose(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self.engine.dispose()


def _add_missing_columns(engine: Engine) -> None:
    """`create_all` leaves existing tables alone: a column added in a later version is added here,
    with its default for the rows already there (every such column has a `server_default` or is nullable)."""
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            if not inspector.has_table(table.name):
                continue
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                kind = column.type.compile(engine.dialect)
                default = ""
                if column.server_default is not None:
                    arg = column.server_default.arg
                    default = f" DEFAULT '{arg}'" if isinstance(arg, str) else f" DEFAULT {arg.text}"
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}{default}'))


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class JobRow(Base):
    """One unit of queued work: a design job or a regression run. The queue is the `queued` rows."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    phase: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The last phase that finished: a restarted server resumes after it when the job kind can.
    checkpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobEventRow(Base):
    """One event of a job (phase, round, attempt, epoch, metric, log line), in order."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    ts: Mapped[float] = mapped_column(Float, default=time.time)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict] = mapped_column(JSON, default=dict)
