"""A server killed with SIGKILL mid-job and started again loses nothing: queued jobs run, a running
regression run is requeued and finishes, a running design job ends 'interrupted by restart', orphaned
sandbox containers are reaped, and uploads and artifacts are still there."""

from __future__ import annotations

import base64
import io
import socket
import zipfile

import docker
import pytest

from service.data import simulate
from service.jobs import INTERRUPTED

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _bundle(source: str) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("test_it.py", source)
    return base64.b64encode(buf.getvalue()).decode()


QUICK = _bundle("def test_quick():\n    assert True\n")
SLOW = _bundle("import time\n\ndef test_slow():\n    time.sleep(6)\n")


def _owned_by(pid: int) -> list:
    prefix = f"{socket.gethostname()}:{pid}:"
    listed = docker.from_env().containers.list(all=True, sparse=True, filters={"label": "cellforge.managed=true"})
    return [c for c in listed if (c.attrs.get("Labels") or {}).get("cellforge.owner", "").startswith(prefix)]


def test_sigkill_mid_job_then_restart_loses_nothing(tmp_path, docker_image, make_server):
    server = make_server(tmp_path, "--workers", "2").start()
    try:
        tenant = server.tenant("durable", max_jobs=5, max_sandboxes=5)
        data = tmp_path / "ko.h5ad"
        simulate("knockout", 0, n_cells=3000, n_genes=100).write_h5ad(data)
        with server.client(tenant) as c:
            dataset = c.upload_dataset(data)
            before = c.wait(c.submit_regression(kind="pytest", bundle_zip_b64=QUICK).id, timeout=120)
            assert before.status == "succeeded"
            design = c.submit_job(dataset.id, "Predict expression after CRISPR knockout of unseen genes",
                                  max_attempts=1)
            slow = c.submit_regression(kind="pytest", bundle_zip_b64=SLOW)
            queued = c.submit_regression(kind="pytest", bundle_zip_b64=QUICK)
            # Kill while the slow suite runs in its sandbox and the design job is mid-pipeline.
            for event in c.job_events(slow.id):
                if event.kind == "phase" and event.data["phase"] == "pytest":
                    break
            assert c.get_job(design.id).status == "running"
            assert c.get_job(queued.id).status == "queued"
        old_pid = server.proc.pid
        server.kill()
        assert _owned_by(old_pid), "the killed server's sandbox containers should still be there"

        server.start()
        with server.client(tenant, "grpc") as c:
            assert not _owned_by(old_pid), "orphaned containers are reaped at start-up"
            assert c.get_job(design.id).status == "failed"
            assert c.get_job(design.id).error == INTERRUPTED
            resumed = c.wait(slow.id, timeout=120)
            assert resumed.status == "succeeded" and resumed.result["passed"] is True
            assert resumed.result["summary"]["passed"] == 1
            assert c.wait(queued.id, timeout=120).status == "succeeded"
            assert dataset.id in {d.id for d in c.list_datasets()}
            assert b"testcase" in c.get_artifact(before.id, "junit.xml")
            statuses = [e.data for e in c.job_events(slow.id) if e.kind == "status"]
            assert [s["status"] for s in statuses] == ["queued", "running", "queued", "running", "succeeded"]
            assert "restart" in statuses[2]["detail"]
            c.create_sandbox(memory="256m")
            assert _owned_by(server.proc.pid)
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert not _owned_by(server.proc.pid), "a clean stop (SIGTERM) removes its sandboxes"
