"""Running the server: one core, the HTTP transport (uvicorn) and the gRPC transport in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from .core import CellForgeCore, CoreConfig
from .grpc_server import start_grpc
from .http_app import create_app

log = logging.getLogger(__name__)


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

    def core_config(self) -> CoreConfig:
        return CoreConfig(
            data_dir=self.data_dir, db_url=self.db_url, warm=self.warm, preload=self.preload,
            idle_timeout=self.idle_timeout, max_lifetime=self.max_lifetime, max_upload=self.max_upload,
            workers=self.workers,
        )


class _HttpServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT once it has stopped serving, which ends the process before the
    core shuts down and leaves its sandboxes running; this one just stops serving on them."""

    @contextlib.contextmanager
    def capture_signals(self):
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers), then stop both transports and the core."""
    core = CellForgeCore(config.core_config())
    await core.start()
    grpc_server = None
    try:
        if config.grpc_port:
            grpc_server, bound = await start_grpc(core, config.host, config.grpc_port)
            log.warning("gRPC on %s:%d", config.host, bound)
        http = _HttpServer(uvicorn.Config(
            create_app(core), host=config.host, port=config.http_port, log_level="warning", lifespan="off",
            timeout_graceful_shutdown=5,
        ))
        log.warning("HTTP on http://%s:%d", config.host, config.http_port)
        await http.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
        await core.stop()


def run_server(config: ServerConfig) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
