"""The service's database: one SQLAlchemy 2.0 engine (SQLite by default, PostgreSQL by URL), its sessions,
and a bounded executor for calls from async code."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from tenacity import retry, retry_if_exception_message, stop_after_delay, wait_exponential

T = TypeVar("T")
# Threads for database calls; a busy default executor (uploads, Docker calls) never delays them.
DB_THREADS = 8


def default_db_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / 'cellforge.db'}"


class Database:
    """An engine, a session factory and a bounded executor for calls from async code. SQLite runs in
    WAL mode so the CLI and the server can share it; `?timeout=S` in its URL sets how long a write
    waits for the lock (default 30 s)."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            connect_args: dict[str, Any] = {"check_same_thread": False}
            if "timeout" not in make_url(url).query:
                connect_args["timeout"] = 30
            self.engine: Engine = create_engine(url, connect_args=connect_args)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=DB_THREADS)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._executor: ThreadPoolExecutor | None = None

    def upgrade(self) -> list[str]:
        """Bring the schema to the newest migration (`alembic upgrade head`); returns the revisions applied."""
        from .migrate import upgrade

        return upgrade(self.engine)

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

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` (a blocking database call) on the database's own threads."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="cellforge-db")
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def dispose(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    _wal_mode(cur)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# Switching a new database to WAL needs its exclusive lock, and SQLite answers "database is locked" at once,
# without its busy timeout, while another connection (a server or CLI starting beside this one) holds a lock.
@retry(retry=retry_if_exception_message(match="database is locked"), wait=wait_exponential(0.01, max=0.5),
       stop=stop_after_delay(30), reraise=True)
def _wal_mode(cur: Any) -> None:
    if cur.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        cur.execute("PRAGMA journal_mode=WAL")
