"""`cellforge serve` (HTTP + gRPC over one core) and `cellforge tenants create|list|revoke`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)
out = Console()

DEFAULT_DATA_DIR = os.environ.get("CELLFORGE_DATA_DIR", str(Path.home() / ".local" / "share" / "cellforge"))

DbOpt = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL (default: SQLite under --data-dir)")]
DataDirOpt = Annotated[Path, typer.Option("--data-dir", help="uploads, artifacts and the default SQLite file")]


def _database(db: str | None, data_dir: Path):
    from service.db import Database, default_db_url

    data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(db or os.environ.get("CELLFORGE_DB") or default_db_url(data_dir))
    database.upgrade()
    return database


tenants_app = typer.Typer(help="Create, list and revoke API tenants.", no_args_is_help=True)


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="tenant name (letters, digits, . _ -)")],
    db: DbOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA_DIR),
    max_sandboxes: Annotated[int, typer.Option(help="live sandboxes at once")] = 4,
    max_jobs: Annotated[int, typer.Option(help="queued + running jobs at once")] = 2,
    max_gpus: Annotated[int, typer.Option(help="GPUs over all live sandboxes")] = 0,
    max_memory: Annotated[str, typer.Option(help="memory over all live sandboxes, e.g. 8g")] = "8g",
    rate_limit: Annotated[float, typer.Option(help="API requests per second (burst: twice that)")] = 50.0,
    max_cpus: Annotated[float, typer.Option(help="CPUs over all live sandboxes and running jobs")] = 8.0,
    max_storage: Annotated[str, typer.Option(help="bytes of uploaded datasets, e.g. 20g")] = "20g",
    runtime: Annotated[str | None, typer.Option(
        help="container runtime of this tenant's sandboxes, e.g. runsc (default: the engine's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Create a tenant and print its API key (shown only this once)."""
    from service.api.errors import ServiceError
    from service.api.tenants import create_tenant

    try:
        tenant, key = create_tenant(
            _database(db, data_dir), name, max_sandboxes=max_sandboxes, max_jobs=max_jobs,
            max_gpus=max_gpus, max_memory=max_memory, rate_limit=rate_limit, max_cpus=max_cpus,
            max_storage=max_storage, runtime=runtime,
        )
    except ServiceError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps({"id": tenant.id, "name": tenant.name, "api_key": key}))
        return
    err.print(f"created tenant [bold]{tenant.name}[/bold] ({tenant.id}); its API key (shown only once):")
    print(key)


@tenants_app.command("list")
def tenants_list(
    db: DbOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA_DIR),
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """List tenants and their limits (never their keys)."""
    from dataclasses import asdict

    from service.api.tenants import list_tenants

    tenants = list_tenants(_database(db, data_dir))
    if as_json:
        print(json.dumps({"tenants": [asdict(t) for t in tenants]}))
        return
    table = Table("id", "name", "sandboxes", "jobs", "cpus", "gpus", "memory", "storage", "runtime", "rate/s",
                  "state")
    for t in tenants:
        state = "revoked" if t.revoked_at else "active"
        table.add_row(t.id, t.name, str(t.max_sandboxes), str(t.max_jobs), f"{t.max_cpus:g}", str(t.max_gpus),
                      t.max_memory, t.max_storage, t.runtime or "default", f"{t.rate_limit:g}", state)
    out.print(table)


@tenants_app.command("revoke")
def tenants_revoke(
    name: Annotated[str, typer.Argument(help="tenant name or id")],
    db: DbOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA_DIR),
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Revoke a tenant's API key: its later calls answer 401; a running server closes its sandboxes and
    cancels its jobs within seconds."""
    from service.api.errors import ServiceError
    from service.api.tenants import revoke_tenant

    try:
        tenant = revoke_tenant(_database(db, data_dir), name)
    except ServiceError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps({"id": tenant.id, "name": tenant.name, "revoked_at": tenant.revoked_at}))
    else:
        err.print(f"revoked tenant [bold]{tenant.name}[/bold] ({tenant.id})")


def register(app: typer.Typer) -> None:
    """Add `serve` and the `tenants` group to the top-level app."""
    app.command("serve")(serve)
    app.add_typer(tenants_app, name="tenants")


def serve(
    http_port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (0: no gRPC)")] = 50051,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    db: DbOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA_DIR),
    warm: Annotated[int, typer.Option(help="warm sandboxes kept ready for the default spec")] = 1,
    preload: Annotated[str, typer.Option(help="code run in each new sandbox before it is handed out")] = (
        "import numpy, pandas, scipy"
    ),
    workers: Annotated[int, typer.Option(help="job worker tasks")] = 2,
    idle_timeout: Annotated[float, typer.Option(help="seconds before an idle sandbox is reaped")] = 600.0,
    max_lifetime: Annotated[float, typer.Option(help="seconds a sandbox may live")] = 3600.0,
    max_upload: Annotated[str, typer.Option(help="largest accepted dataset upload")] = "2g",
    header_timeout: Annotated[float, typer.Option(
        help="seconds an HTTP connection has to send a complete request head")] = 10.0,
    body_timeout: Annotated[float, typer.Option(
        help="seconds a request body may pause before the request is answered 408")] = 30.0,
    max_connections: Annotated[int, typer.Option(help="open HTTP connections (more are closed at once)")] = 1000,
    max_connections_per_client: Annotated[int, typer.Option(help="open HTTP connections from one address")] = 256,
    limit_concurrency: Annotated[int, typer.Option(
        help="HTTP requests in flight (more answer 503); keep it above --max-connections")] = 1024,
    keep_alive: Annotated[int, typer.Option(help="seconds an idle HTTP keep-alive connection stays open")] = 5,
    backlog: Annotated[int, typer.Option(help="listen backlog of the HTTP socket")] = 1024,
    db_retry: Annotated[float, typer.Option(
        help="seconds a failing database write of a job is retried before the job fails")] = 10.0,
    grpc_max_rpcs: Annotated[int, typer.Option(help="gRPC calls in flight (more answer RESOURCE_EXHAUSTED)")] = 256,
    ray_address: Annotated[str | None, typer.Option(
        help="run the API's sandboxes on a Ray cluster: 'auto' (this machine's cluster) or ray://HOST:PORT; "
        "its sandbox nodes offer the cellforge_sandbox resource (default: this machine's Docker engine)")] = None,
    replica_id: Annotated[str | None, typer.Option(
        help="this server's name among API replicas sharing one database (default HOSTNAME:HTTP-PORT); "
        "keep it across restarts so a restarted replica takes back its own jobs at once")] = None,
) -> None:
    """Serve the HTTP and gRPC APIs over one core (sandboxes, datasets, jobs, regressions)."""
    if ray_address is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            err.print("[red]error:[/red] --ray-address needs Ray: pip install 'cellforge[ray]'")
            raise typer.Exit(2) from None
    from service.api.connections import ConnectionLimits
    from service.api.grpc_server import GrpcLimits
    from service.api.server import ServerConfig, run_server

    config = ServerConfig(
        http_port=http_port, grpc_port=grpc_port, host=host, db_url=db, data_dir=data_dir, warm=warm,
        preload=preload, workers=workers, idle_timeout=idle_timeout, max_lifetime=max_lifetime,
        max_upload=max_upload, body_timeout=body_timeout, limit_concurrency=limit_concurrency, timeout_keep_alive=keep_alive, backlog=backlog,
        connections=ConnectionLimits(header_timeout=header_timeout, max_connections=max_connections,
                                     max_per_client=max_connections_per_client),
        grpc=GrpcLimits(max_concurrent_rpcs=grpc_max_rpcs), db_retry=db_retry, ray_address=ray_address,
        replica_id=replica_id,
    )
    run_server(config)
