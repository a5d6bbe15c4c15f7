"""A throwaway PostgreSQL server for tests: `initdb` into a fresh folder, `pg_ctl start` on a free
loopback port, removed afterwards. initdb refuses to run as root, so as root the server runs as the
`postgres` system user (the Debian package makes it).

Where PostgreSQL is not installed the tests that need it skip, saying so; under CI (`CI=true`) they fail
instead: there `scripts/setup.sh` installs it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}: CI must have PostgreSQL (scripts/setup.sh installs it under CI)")
    pytest.skip(f"{what}: install PostgreSQL (apt-get install postgresql, or CELLFORGE_POSTGRES=1 scripts/setup.sh)")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A running PostgreSQL server; yields its SQLAlchemy URL without a database name
    (`postgresql+psycopg://postgres@127.0.0.1:PORT`)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed (pip install 'cellforge[postgres]')")
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        _missing("initdb/pg_ctl not found")
    assert initdb is not None and pg_ctl is not None
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="cellforge-pg-"))
    if os.geteuid() == 0:
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            _missing("running as root and there is no `postgres` user to run the server as")
        os.chown(folder, pg.pw_uid, pg.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        options = f"-p {port} -h 127.0.0.1 -k {folder} -c fsync=off -c max_connections=200"
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "-t", "60",
                        "start"], check=True, capture_output=True, timeout=90)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server: str) -> str:
    """A fresh database on `server` (a URL from `postgres_server`); its URL."""
    import psycopg

    name = f"cellforge_{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + 10
    while True:
        try:
            with psycopg.connect(server.replace("postgresql+psycopg", "postgresql") + "/postgres",
                                 autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            return f"{server}/{name}"
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
