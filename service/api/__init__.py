"""The service's APIs: HTTP (FastAPI) and gRPC over one core, with tenants, quotas and an audit log."""

from .core import CellForgeCore, CoreConfig
from .errors import (
    BadRequest,
    Conflict,
    InvalidDataset,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from .server import ServerConfig, run_server, serve
from .tenants import Tenant, authenticate, create_tenant, list_tenants, revoke_tenant

__all__ = [
    "BadRequest",
    "CellForgeCore",
    "Conflict",
    "CoreConfig",
    "InvalidDataset",
    "NotFound",
    "PayloadTooLarge",
    "QuotaExceeded",
    "ServerConfig",
    "ServiceError",
    "Tenant",
    "Unauthenticated",
    "Unavailable",
    "authenticate",
    "create_tenant",
    "list_tenants",
    "revoke_tenant",
    "run_server",
    "serve",
]
