"""Running the server: one core, the HTTP transport (uvicorn) and the gRPC transport in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from sandbox import SandboxBackend
from service.errors import CellForgeError

from . import logs
from .connections import ConnectionLimits, guarded_protocol, throttle_logs
from .core import CellForgeCore, CoreConfig
from .grpc_server import GrpcLimits, start_grpc
from .http_app import create_app

log = logging.getLogger(__name__)
# The hint of both "cannot listen" errors, which callers (the tests' server harness) match on.
PORT_IN_USE = "is another server using the port?"


@dataclass
class ServerConfig:
    data_dir: Path
    http_port: int = 8000
    grpc_port: int = 50051
    host: str = "127.0.0.1"
    db_url: str | None = None
    warm: int = 1
    preload: str = "import numpy, pandas, scipy"
    workers: int = 2
    idle_timeout: float = 600.0
    max_lifetime: float = 3600.0
    max_upload: str = "2g"
    db_retry: float = 10.0
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    body_timeout: float = 30.0  # seconds a request body may pause before the request is answered 408
    # uvicorn's own limits: requests in flight (more answer 503; it counts open connections too, so it
    # stays above the connection cap), idle keep-alive, a request head's largest size, the listen backlog.
    limit_concurrency: int = 1024
    timeout_keep_alive: int = 5
    max_head_bytes: int = 16 << 10
    backlog: int = 1024
    grpc: GrpcLimits = field(default_factory=GrpcLimits)
    # Threads of the loop's default executor (the sandbox engine's blocking Docker calls run there).
    default_threads: int = 32
    # A Ray cluster ("auto", "ray://HOST:PORT") whose nodes host the API's sandboxes; None: this
    # machine's Docker engine.
    ray_address: str | None = None
    # This server's name among API replicas on one database; None: HOSTNAME:HTTP_PORT (stable across restarts).
    replica_id: str | None = None

    def core_config(self) -> CoreConfig:
        return CoreConfig(
            data_dir=self.data_dir, db_url=self.db_url, warm=self.warm, preload=self.preload,
            idle_timeout=self.idle_timeout, max_lifetime=self.max_lifetime, max_upload=self.max_upload,
            workers=self.workers, db_retry=self.db_retry, backend=self.sandbox_backend(),
            replica=self.replica_id or f"{socket.gethostname()}:{self.http_port}", ray_address=self.ray_address,
        )

    def sandbox_backend(self) -> SandboxBackend | None:
        """The Ray backend when a cluster is named; None: the core's default (Docker on this machine)."""
        if self.ray_address is None:
            return None
        from sandbox.ray_backend import SERVER_SPARE_TTL_S, RayBackend  # Ray is an optional extra, imported when asked for

        # Detached actors: a sandbox outlives the replica that created it (any replica reaches it by name).
        return RayBackend(self.ray_address, detached=True, spare_ttl=SERVER_SPARE_TTL_S)


class _HttpServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT once it has stopped serving, which ends the process before the
    core shuts down and leaves its sandboxes running; this one just stops serving on them."""

    announce: tuple[str, ...] = ()  # logged once the socket is served

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            for line in self.announce:
                log.warning(line)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # embedded: stopped by should_exit
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def http_config(app, config: ServerConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=config.host, port=config.http_port, log_level="warning", lifespan="off",
        timeout_graceful_shutdown=5, http=guarded_protocol(config.connections),
        limit_concurrency=config.limit_concurrency, timeout_keep_alive=config.timeout_keep_alive,
        h11_max_incomplete_event_size=config.max_head_bytes, backlog=config.backlog,
    )


class StartupError(CellForgeError):
    """The server cannot start (a port it cannot listen on); nothing was left running."""


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """The HTTP socket, bound before anything starts, so a port in use is reported as it is."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: accepted sockets inherit it, and asyncio turns Nagle off (TCP_NODELAY) only on
    # sockets that say TCP. With Nagle on, each answer after a connection's first waited out the client's
    # delayed ACK: 40 ms per keep-alive request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}; {PORT_IN_USE} "
                           "(--http-port)") from None
    sock.set_inheritable(True)
    return sock


async def serve(config: ServerConfig, http: list[uvicorn.Server] | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers; embedded in a thread: until the uvicorn server
    appended to `http` gets `should_exit`), then stop both transports and the core. StartupError when a
    port cannot be listened on; "listening" is logged only once both are."""
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(config.default_threads, thread_name_prefix="cellforge-io"))
    _raise_fd_limit(config.connections.max_connections)
    http_socket = listen(config.host, config.http_port, config.backlog)
    core = CellForgeCore(config.core_config())
    try:
        await core.start()
    except BaseException:
        http_socket.close()
        raise
    grpc_server = None
    try:
        if config.grpc_port:
            try:
                grpc_server, bound = await start_grpc(core, config.host, config.grpc_port, config.grpc)
            except RuntimeError as exc:  # grpcio: "Failed to bind to address ..."
                raise StartupError(f"cannot listen for gRPC on {config.host}:{config.grpc_port} ({exc}); "
                                   f"{PORT_IN_USE} (--grpc-port)") from None
        server = _HttpServer(http_config(create_app(core, config.body_timeout), config))
        server.announce = (f"HTTP listening on http://{config.host}:{http_socket.getsockname()[1]} (docs at /docs)",
                           *([f"gRPC listening on {config.host}:{bound}"] if grpc_server else []))
        if http is not None:
            http.append(server)
        await server.serve(sockets=[http_socket])
    finally:
        http_socket.close()
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
        await core.stop()


def _raise_fd_limit(connections: int) -> None:
    """Room for the connection cap plus the server's own files, sockets and containers' pipes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 1024
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            log.warning("open-file limit %d is below --max-connections %d + 1024; lower the cap or raise "
                        "the limit", target, connections)


def run_server(config: ServerConfig) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logs.configure()
    throttle_logs("uvicorn.error", "cellforge.connections", "service.api.http_app", "service.api.grpc_server",
                  "service.jobs.store")
    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        log.error("not started: %s", exc)
        raise SystemExit(1) from None
