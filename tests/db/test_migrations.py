"""Schema migrations on a real SQLite file: a fresh database reaches exactly the schema the tables
declare, a database made before migrations existed is upgraded in place keeping its rows, and
processes starting together migrate once."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from service.api.tenants import create_tenant, list_tenants
from service.db import Base, Database
from service.db.migrate import config


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'cellforge.db'}")
    yield database
    database.dispose()


def _schema_drift(db: Database) -> list:
    with db.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_a_fresh_database_gets_every_table_the_code_declares(db):
    assert db.upgrade() == ["0001", "0002", "0003"]
    assert _schema_drift(db) == []
    assert db.upgrade() == []  # already current: nothing applied


def _first_release_without_migrations(db: Database, *, with_new_columns: bool) -> None:
    """The schema as `create_all` made it before migrations existed: no `alembic_version` table;
    with `with_new_columns`, the tenant columns a later release added by hand are there already."""
    with db.engine.begin() as conn:
        command.upgrade(config(conn), "0002" if with_new_columns else "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("INSERT INTO tenants (id, name, key_id, key_hash, max_sandboxes, max_jobs, max_gpus,"
                          " max_memory, rate_limit, created_at) VALUES ('tn_000000000001', 'old', 'k', 'h', 4, 2,"
                          " 0, '8g', 50, 0)"))


@pytest.mark.parametrize("with_new_columns", [False, True], ids=["first-release", "columns-added-by-hand"])
def test_a_database_made_before_migrations_is_upgraded_keeping_its_tenants(db, with_new_columns):
    _first_release_without_migrations(db, with_new_columns=with_new_columns)

    assert db.upgrade() == ["0002", "0003"]
    assert _schema_drift(db) == []
    (old,) = list_tenants(db)
    assert (old.name, old.max_cpus, old.max_storage, old.runtime) == ("old", 8.0, "20g", None)
    fresh, _ = create_tenant(db, "new", max_storage="1g", runtime="runsc")
    assert (fresh.max_storage, fresh.runtime) == ("1g", "runsc")


def test_a_new_database_turns_to_wal_once_another_connection_lets_go_of_its_lock(tmp_path):
    """SQLite refuses to switch a database to WAL at once, without its busy timeout, while another connection
    holds the write lock (a CLI creating its tables while the server starts): the switch waits for the lock
    instead of failing the server's start (CI: `database is locked` in the test below)."""
    path = tmp_path / "cellforge.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE made_by_the_cli (x)")
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.5, other.execute, ("COMMIT",))
    release.start()
    database = Database(f"sqlite:///{path}")
    try:
        with database.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        database.dispose()
        release.join()
        other.close()


def test_servers_starting_together_migrate_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'cellforge.db'}"
    applied: list[list[str]] = []
    errors: list[BaseException] = []

    def start() -> None:
        database = Database(url)
        try:
            applied.append(database.upgrade())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            database.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(applied) == [[], [], [], ["0001", "0002", "0003"]]
    database = Database(url)
    try:
        assert set(inspect(database.engine).get_table_names()) == {*Base.metadata.tables, "alembic_version"}
    finally:
        database.dispose()
