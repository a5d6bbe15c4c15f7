"""Tenants and their API keys: created once (the key is shown once), stored hashed, looked up per call.

A key reads `cf_<key_id>_<secret>`. The key id finds the row in one indexed lookup; only sha256 of
the secret is stored, compared in constant time. Secrets are 256 random bits, so a fast hash is
enough (no password stretching needed).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from sandbox.spec import parse_size
from sandbox.errors import SpecError
from service.jobs.db import Database

from .errors import BadRequest, Conflict, NotFound, Unauthenticated
from .records import TenantRow

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_RE = re.compile(r"^cf_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
# Container runtimes a tenant or a request may name, by isolation strength: a request never gets a
# runtime weaker than its tenant's default. None is the engine's default runtime (runc).
RUNTIME_STRENGTH = {"runc": 0, "runsc": 1}


@dataclass(frozen=True)
class Tenant:
    """An authenticated tenant and its limits (a detached copy of the row)."""

    id: str
    name: str
    max_sandboxes: int
    max_jobs: int
    max_gpus: int
    max_memory: str
    rate_limit: float
    created_at: float
    revoked_at: float | None
    max_cpus: float = 8.0
    max_storage: str = "20g"
    runtime: str | None = None

    @property
    def max_memory_bytes(self) -> int:
        return parse_size(self.max_memory, "max_memory")

    @property
    def max_storage_bytes(self) -> int:
        return parse_size(self.max_storage, "max_storage")

    def runtime_for(self, requested: str | None) -> str | None:
        """The runtime a sandbox of this tenant runs under: the request's, if it is at least as strong
        as the tenant's default, else BadRequest."""
        if requested is None:
            return self.runtime
        if requested not in RUNTIME_STRENGTH:
            raise BadRequest(f"runtime: expected one of {sorted(RUNTIME_STRENGTH)}, got {requested!r}")
        if self.runtime is not None and RUNTIME_STRENGTH[requested] < RUNTIME_STRENGTH.get(self.runtime, 0):
            raise BadRequest(f"runtime: this tenant's sandboxes run under {self.runtime!r}; "
                             f"{requested!r} is weaker")
        return requested

    @classmethod
    def from_row(cls, row: TenantRow) -> Tenant:
        return cls(
            id=row.id, name=row.name, max_sandboxes=row.max_sandboxes, max_jobs=row.max_jobs,
            max_gpus=row.max_gpus, max_memory=row.max_memory, rate_limit=row.rate_limit,
            created_at=row.created_at, revoked_at=row.revoked_at, max_cpus=row.max_cpus,
            max_storage=row.max_storage, runtime=row.runtime,
        )


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_tenant(
    db: Database,
    name: str,
    *,
    max_sandboxes: int = 4,
    max_jobs: int = 2,
    max_gpus: int = 0,
    max_memory: str = "8g",
    rate_limit: float = 50.0,
    max_cpus: float = 8.0,
    max_storage: str = "20g",
    runtime: str | None = None,
) -> tuple[Tenant, str]:
    """A new tenant and its API key (returned only here; the database keeps a hash)."""
    if not _NAME_RE.match(name or ""):
        raise BadRequest(f"tenant name: expected letters, digits, '.', '_' or '-' (max 64), got {name!r}")
    for field, value in (("max-sandboxes", max_sandboxes), ("max-jobs", max_jobs), ("max-gpus", max_gpus)):
        if value < 0:
            raise BadRequest(f"{field}: expected a number >= 0, got {value}")
    if rate_limit <= 0:
        raise BadRequest(f"rate-limit: expected requests per second > 0, got {rate_limit}")
    if max_cpus < 0:
        raise BadRequest(f"max-cpus: expected a number >= 0, got {max_cpus}")
    if runtime is not None and runtime not in RUNTIME_STRENGTH:
        raise BadRequest(f"runtime: expected one of {sorted(RUNTIME_STRENGTH)}, got {runtime!r}")
    try:
        parse_size(max_memory, "max-memory")
        parse_size(max_storage, "max-storage")
    except SpecError as exc:
        raise BadRequest(str(exc)) from None
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    row = TenantRow(
        id="tn_" + secrets.token_hex(6), name=name, key_id=key_id, key_hash=_hash(secret),
        max_sandboxes=max_sandboxes, max_jobs=max_jobs, max_gpus=max_gpus, max_memory=max_memory,
        rate_limit=rate_limit, created_at=time.time(), max_cpus=max_cpus, max_storage=max_storage, runtime=runtime,
    )
    try:
        with db.session() as s:
            s.add(row)
    except IntegrityError:
        raise Conflict(f"a tenant named {name!r} already exists") from None
    return Tenant.from_row(row), f"cf_{key_id}_{secret}"


def list_tenants(db: Database) -> list[Tenant]:
    with db.session() as s:
        return [Tenant.from_row(r) for r in s.scalars(select(TenantRow).order_by(TenantRow.created_at))]


def revoke_tenant(db: Database, name_or_id: str) -> Tenant:
    """Revoke a tenant's key: every later call with it answers 401, and a running server closes its
    sandboxes and cancels its jobs within seconds (see `CellForgeCore`)."""
    with db.session() as s:
        row = s.scalar(select(TenantRow).where((TenantRow.name == name_or_id) | (TenantRow.id == name_or_id)))
        if row is None:
            raise NotFound(f"no tenant named {name_or_id!r}")
        row.revoked_at = row.revoked_at or time.time()
        return Tenant.from_row(row)


def authenticate(db: Database, authorization: str | None) -> Tenant:
    """The tenant whose key is in an `Authorization: Bearer <key>` value; Unauthenticated otherwise."""
    if not authorization:
        raise Unauthenticated("missing credentials: send 'Authorization: Bearer <api key>'")
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("malformed Authorization header: expected 'Bearer <api key>'")
    match = _KEY_RE.match(key.strip())
    if not match:
        raise Unauthenticated("invalid API key")
    key_id, secret = match.groups()
    with db.session() as s:
        row = s.scalar(select(TenantRow).where(TenantRow.key_id == key_id))
        tenant = Tenant.from_row(row) if row is not None else None
        digest = row.key_hash if row is not None else ""
    if tenant is None or not hmac.compare_digest(digest, _hash(secret)):
        raise Unauthenticated("invalid API key")
    if tenant.revoked_at is not None:
        raise Unauthenticated("this API key was revoked")
    return tenant
