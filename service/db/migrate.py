"""Schema migrations (Alembic), applied at start-up by the server and by the tenant commands.

A database made before migrations existed (by `create_all`, with no `alembic_version` table) is
stamped as the first release's schema and upgraded from there. The upgrade runs in one transaction
holding the database's write lock, so a server and a CLI starting together do not both create tables.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).parent / "migrations"
FIRST_RELEASE = "0001"
# Any number, the same in every process: PostgreSQL's advisory lock serializing upgrades.
_PG_LOCK = 0x63656C6C


def config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> list[str]:
    """`alembic upgrade head`; returns the revisions applied (none when the schema is current)."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK})")
        cfg = config(conn)
        before = current(conn)
        if before is None and inspect(conn).has_table("tenants"):
            command.stamp(cfg, FIRST_RELEASE)  # made by create_all before migrations existed
            before = FIRST_RELEASE
        command.upgrade(cfg, "head")
        after = current(conn)
    return _between(cfg, before, after)


def _between(cfg: Config, before: str | None, after: str | None) -> list[str]:
    from alembic.script import ScriptDirectory

    if before == after:
        return []
    revisions = ScriptDirectory.from_config(cfg).iterate_revisions(after, before)
    return [r.revision for r in reversed(list(revisions))]
