"""Real `cellforge serve` processes on loopback, tenants made with the real CLI, clients for both transports."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


from service.api.server import PORT_IN_USE
from service.client import CellForgeClient

CLI = [sys.executable, "-m", "service.cli"] if not (Path(sys.executable).parent / "cellforge").exists() else [
    str(Path(sys.executable).parent / "cellforge")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(AssertionError):
    """The server exited because a port it was given was taken."""


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"cellforge {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def bundle(files: dict[str, str]) -> str:
    """A code bundle (file name -> text) as a regression request carries it: a base64 zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return base64.b64encode(buf.getvalue()).decode()


def database_url(data_dir: Path) -> str:
    """SQLite in the data dir; with CELLFORGE_TEST_POSTGRES=postgresql+psycopg://user@host:port, a fresh
    PostgreSQL database per server instead (the same suite then runs against PostgreSQL)."""
    server = os.environ.get("CELLFORGE_TEST_POSTGRES")
    if not server:
        return f"sqlite:///{data_dir / 'cellforge.db'}"
    import psycopg

    name = f"cellforge_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


@dataclass
class Tenant:
    name: str
    key: str


class Server:
    """One `cellforge serve` subprocess; can be SIGKILLed and started again on the same data dir."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.db_url = database_url(data_dir)
        self.extra = extra
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.started = False  # ever ready: then a restart keeps its ports
        self.log = data_dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 60.0) -> Server:
        """Start and wait until ready. A port `free_port` found free can be taken by another process (a Ray
        worker, a parallel test) before the server binds it; the first start then retries on fresh ports (a
        restart keeps its ports: clients made before it hold the old address)."""
        attempts = 3
        while True:
            try:
                return self._start(timeout)
            except PortTaken:
                attempts -= 1
                if self.started or not attempts:
                    raise
                self.http_port, self.grpc_port = free_port(), free_port()

    def _start(self, timeout: float) -> Server:
        args = [*CLI, "serve", "--data-dir", str(self.data_dir), "--db", self.db_url,
                "--http-port", str(self.http_port),
                "--grpc-port", str(self.grpc_port), "--warm", "0", "--preload", "", *self.extra]
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log.read_bytes()
                error = PortTaken if PORT_IN_USE.encode() in log[offset:] else AssertionError
                raise error(f"server exited with {self.proc.returncode}: {log.decode(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    self.started = True
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout}s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def tenant(self, name: str, **limits) -> Tenant:
        """A tenant in the server's database (in-process: the CLI itself is tested in test_tenants_and_limits)."""
        from service.api.tenants import create_tenant
        from service.db import Database

        db = Database(self.db_url)
        try:
            _, key = create_tenant(db, name, **limits)
        finally:
            db.dispose()
        return Tenant(name, key)

    def tenant_id(self, name: str) -> str:
        from service.api.tenants import list_tenants
        from service.db import Database

        db = Database(self.db_url)
        try:
            return next(t.id for t in list_tenants(db) if t.name == name)
        finally:
            db.dispose()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`cellforge tenants ...` against this server's database."""
        return cli(*args, "--data-dir", str(self.data_dir), "--db", self.db_url, check=check)

    def cli_tenant(self, name: str, *options: str) -> Tenant:
        out = self.cli("tenants", "create", name, "--json", *options)
        return Tenant(name, json.loads(out.stdout.strip().splitlines()[-1])["api_key"])

    def client(self, tenant: Tenant, transport: str = "http") -> CellForgeClient:
        return CellForgeClient(self.url if transport == "http" else self.grpc_target, tenant.key, transport=transport)


def tenant_id(server: Server, name: str) -> str:
    from service.api.tenants import list_tenants
    from service.db import Database

    db = Database(server.db_url)
    try:
        return next(t.id for t in list_tenants(db) if t.name == name)
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory, docker_image):
    srv = Server(tmp_path_factory.mktemp("api"), "--max-upload", "4m", "--workers", "2")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alice(server) -> Tenant:
    return server.tenant("alice", max_sandboxes=3, max_jobs=3, rate_limit=200)


@pytest.fixture(scope="module")
def bob(server) -> Tenant:
    return server.tenant("bob", max_sandboxes=2, rate_limit=200)


@pytest.fixture(scope="session")
def make_server():
    """The `Server` class, for tests that run (and kill) a server of their own."""
    return Server


@pytest.fixture(params=["http", "grpc"])
def transport(request) -> str:
    return request.param


