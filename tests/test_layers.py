"""The layering, checked in fresh processes: persistence and jobs sit below the APIs (no cycle), the wire
protocol below everything, and `sandbox` knows nothing of `service`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded_after(imports: str) -> set[str]:
    probe = f"import json, sys\n{imports}\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("imports, forbidden", [
    ("import service.db, service.jobs", ("service.api",)),
    ("import service.protocol, service.protocol.proto.cellforge.v1.cellforge_pb2_grpc",
     ("service.api", "service.db", "fastapi", "sqlalchemy", "docker", "zmq")),
    ("import sandbox, sandbox.docker_backend, sandbox.pool, sandbox.sync, sandbox.provider, sandbox.ray_backend",
     ("service",)),
    # Ray is an optional extra: the single-machine server never loads it. (Slow: a fresh process loads the
    # whole server and CLI.)
    pytest.param("import sandbox, service.api.server, service.cli", ("ray",), marks=pytest.mark.slow),
    ("import cellforge", ("service.pipeline", "service.api", "service.llm", "docker", "fastapi", "torch")),
], ids=["jobs-below-api", "protocol-standalone", "sandbox-knows-no-service", "single-machine-needs-no-ray",
        "python-api-imports-lightly"])
def test_lower_layers_do_not_import_upper_ones(imports, forbidden):
    loaded = _loaded_after(imports)
    assert sorted(m for m in loaded if m.split(".")[0] in forbidden or m.startswith(forbidden)) == []
