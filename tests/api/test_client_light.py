"""The Python client installs without the server: importing it, with both transports, loads the wire
protocol, httpx and grpcio, and none of the server's machinery."""

from __future__ import annotations

import json
import subprocess
import sys

SERVER_ONLY = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "docker", "zmq", "jupyter_client", "anndata", "torch")


def test_the_client_imports_no_server_machinery():
    probe = ("import json, sys\n"
             "from service.client import CellForgeClient\n"
             "from service.client import grpc_transport, http_transport, remote\n"
             f"print(json.dumps([m for m in {SERVER_ONLY!r} if m in sys.modules]))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
