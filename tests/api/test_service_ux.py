"""What a user of the service meets: one error shape for every error, ISO-8601 times, the API docs
served offline, downloads with their content types and safe headers, datasets deduplicated by content,
artifacts streamed in chunks over gRPC, integers that stay integers, honest startup and structured logs."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import time
from datetime import datetime

import grpc
import httpx
import pytest

from service.client import NotFoundError
from service.data import simulate
from service.protocol.proto.cellforge.v1 import cellforge_pb2 as pb
from service.protocol.proto.cellforge.v1 import cellforge_pb2_grpc as pb_grpc

from .conftest import CLI, bundle, tenant_id

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
QUICK = {"test_quick.py": "def test_ok():\n    assert True\n"}


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "screen.h5ad"
    simulate("knockout", 0, n_cells=1500, n_genes=50).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def regression(server, alice):
    with server.client(alice) as c:
        return c.wait(c.submit_regression(kind="pytest", bundle_zip_b64=bundle(QUICK), timeout=120).id, timeout=180)


def _auth(tenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.key}"}


def _log_lines(server, logger: str, until=lambda lines: True, timeout: float = 10.0) -> list[dict]:
    """The server's JSON lines of `logger`, once `until(lines)` holds (a line is written as its call ends,
    just after the answer went out)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in server.log.read_text().splitlines()
                 if line.startswith("{") and f'"logger": "{logger}"' in line]
        if until(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_every_error_has_the_project_shape(server, alice):
    with httpx.Client(base_url=server.url, headers=_auth(alice)) as h:
        answers = {
            "no route": h.get("/v1/nothing-here"),
            "no route outside /v1": h.get("/nothing"),
            "wrong method": h.put("/v1/jobs"),
            "invalid body": h.post("/v1/sandboxes/sb_x/execute", json={"timeout": "soon"}),
            "malformed JSON": h.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}),
            "unknown resource": h.get("/v1/jobs/job_0000000000000000"),
            "no key": httpx.get(f"{server.url}/v1/jobs"),
        }
    statuses = {what: r.status_code for what, r in answers.items()}
    assert statuses == {"no route": 404, "no route outside /v1": 404, "wrong method": 405, "invalid body": 400,
                        "malformed JSON": 400, "unknown resource": 404, "no key": 401}
    for what, r in answers.items():
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, (what, body)
        assert body["error"]["message"], what
    assert answers["no route"].json()["error"]["type"] == "NotFound"
    assert answers["wrong method"].json()["error"]["type"] == "MethodNotAllowed"
    assert "allow" in answers["wrong method"].headers


def test_times_are_iso_8601_in_utc(server, alice, screen, regression):
    with httpx.Client(base_url=server.url, headers=_auth(alice)) as h:
        job = h.get(f"/v1/jobs/{regression.id}").json()
        dataset = h.post("/v1/datasets", params={"name": "screen.h5ad"}, content=screen.read_bytes()).json()
        events = [json.loads(line) for line in h.get(f"/v1/jobs/{regression.id}/events").text.splitlines()]
    for value in (job["created_at"], job["started_at"], job["finished_at"], dataset["created_at"],
                  *(e["ts"] for e in events)):
        assert isinstance(value, str) and ISO_UTC.match(value), value
    assert datetime.fromisoformat(job["created_at"]) <= datetime.fromisoformat(job["finished_at"])


def test_api_docs_are_served_without_internet(server):
    for page, asset in (("/docs", "/docs-assets/swagger-ui-bundle.js"), ("/redoc", "/docs-assets/redoc.standalone.js")):
        html = httpx.get(server.url + page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        assert asset in html.text and "cdn." not in html.text and "fonts.googleapis" not in html.text, page
        script = httpx.get(server.url + asset)
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert len(script.content) > 100_000  # the real bundle, not a placeholder
    css = httpx.get(server.url + "/docs-assets/swagger-ui.css")
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]


def test_downloads_have_content_types_and_safe_headers(server, alice, regression):
    with httpx.Client(base_url=server.url, headers=_auth(alice)) as h:
        xml = h.get(f"/v1/jobs/{regression.id}/artifacts/junit.xml")
        results = h.get(f"/v1/jobs/{regression.id}/artifacts/results.json")
    assert xml.headers["content-type"] == "application/xml"
    assert results.headers["content-type"] == "application/json" and results.json()["summary"]["total"] == 1
    for r in (xml, results):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["content-disposition"].startswith("attachment")
        assert "content-security-policy" not in r.headers


def test_the_same_bytes_are_one_dataset_per_tenant(server, alice, bob, screen, tmp_path):
    digest = hashlib.sha256(screen.read_bytes()).hexdigest()
    other = tmp_path / "other.h5ad"
    simulate("knockout", 7, n_cells=1500, n_genes=50).write_h5ad(other)
    with httpx.Client(base_url=server.url, headers=_auth(alice)) as h:
        first = h.post("/v1/datasets", params={"name": "a.h5ad"}, content=screen.read_bytes())
        again = h.post("/v1/datasets", params={"name": "b.h5ad"}, content=screen.read_bytes())
        found = h.get(f"/v1/datasets/sha256/{digest}")
        listed = [d["id"] for d in h.get("/v1/datasets").json()["datasets"]]
        bad = h.get("/v1/datasets/sha256/not-a-digest")
    assert first.status_code in (200, 201) and again.status_code == 200 and again.json()["reused"] is True
    assert again.json()["id"] == first.json()["id"] == found.json()["id"]
    assert listed.count(first.json()["id"]) == 1
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequest"
    # Another tenant neither sees alice's copy nor shares its id.
    assert httpx.get(f"{server.url}/v1/datasets/sha256/{digest}", headers=_auth(bob)).status_code == 404
    for transport in ("http", "grpc"):
        with server.client(bob, transport) as c:
            theirs = c.upload_dataset(screen)
            assert theirs.id != first.json()["id"]
            assert c.upload_dataset(screen).reused and c.find_dataset(digest).id == theirs.id
            assert c.upload_dataset(other).id not in (theirs.id, first.json()["id"])
    # The client looked the bytes up first: bob's later calls sent the file only for new content.
    posts = [line for line in _log_lines(server, "cellforge.access")
             if line["method"] == "POST" and line.get("path") == "/v1/datasets" and line["tenant"] == tenant_id(server, "bob")]
    assert len(posts) == 2  # the first upload of `screen` and of `other`, over HTTP only


def test_grpc_streams_an_artifact_in_chunks_and_keeps_integers(server, alice, regression, tmp_path):
    # A large artifact: written where the job's outputs live, as a design run's model.pt would be.
    payload = bytes(range(256)) * (12 << 12)  # 12 MiB
    (server.data_dir / "jobs" / regression.id / "artifacts" / "big.bin").write_bytes(payload)
    stub = pb_grpc.CellForgeStub(grpc.insecure_channel(server.grpc_target))
    chunks = [m.data for m in stub.GetArtifact(pb.ArtifactRef(job_id=regression.id, name="big.bin"),
                                               metadata=(("authorization", f"Bearer {alice.key}"),))]
    assert len(chunks) == 12 and max(map(len, chunks)) <= 1 << 20 and b"".join(chunks) == payload
    with server.client(alice, "grpc") as c:
        assert c.download_artifact(regression.id, "big.bin", tmp_path / "big.bin").read_bytes() == payload
        run = c.get_regression(regression.id)
    summary = run.result["summary"]
    assert summary == {"total": 1, "passed": 1, "failed": 0, "error": 0, "skipped": 0}
    assert all(type(v) is int for v in summary.values()) and type(run.attempts) is int
    assert run.created_at.tzinfo is not None and run.final is True


def test_access_and_job_log_lines_are_json(server, alice, regression):
    httpx.get(f"{server.url}/v1/jobs/{regression.id}", headers=_auth(alice))
    with server.client(alice, "grpc") as c:
        c.get_job(regression.id)
        with pytest.raises(NotFoundError):
            c.get_job("job_0000000000000000")
    lines = _log_lines(server, "cellforge.access", until=lambda lines: lines[-1].get("code") == "NOT_FOUND")
    access = [line for line in lines if line.get("path") == f"/v1/jobs/{regression.id}"]
    assert access and access[-1]["status"] == 200 and access[-1]["method"] == "GET"
    assert access[-1]["tenant"].startswith("tn_") and ISO_UTC.match(access[-1]["ts"])
    calls = [(line["method"], line["code"]) for line in lines if line["transport"] == "grpc"]
    assert calls[-2:] == [("GetJob", "OK"), ("GetJob", "NOT_FOUND")]
    jobs = {line["event"]: line for line in _log_lines(server, "cellforge.jobs") if line.get("job") == regression.id}
    assert jobs["job queued"]["kind"] == "regression.pytest"
    assert jobs["job finished"]["status"] == "succeeded" and jobs["job finished"]["seconds"] >= 0
    assert "HTTP listening on" in server.log.read_text()


def test_a_port_in_use_is_reported_not_announced(server, tmp_path):
    clash = subprocess.run([*CLI, "serve", "--data-dir", str(tmp_path), "--http-port", str(server.http_port),
                            "--grpc-port", "0", "--warm", "0"], capture_output=True, text=True, timeout=120)
    assert clash.returncode == 1
    assert f"cannot listen for HTTP on 127.0.0.1:{server.http_port}" in clash.stderr
    assert "listening on" not in clash.stderr + clash.stdout


def test_a_first_start_whose_port_was_taken_meanwhile_retries_on_fresh_ports(make_server, tmp_path):
    """`free_port` only finds a port free at that moment; another process (a Ray worker, a parallel test) can take
    it before the server binds, which made a test fail in CI. The test harness's first start then retries on fresh
    ports; the port it lost is reported in the server's log, not ignored."""
    server = make_server(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.grpc_port))
        taken.listen()
        lost = server.grpc_port
        server.start()
        try:
            assert server.grpc_port != lost and httpx.get(f"{server.url}/readyz").status_code == 200
            assert f"cannot listen for gRPC on 127.0.0.1:{lost}" in server.log.read_text()
        finally:
            server.stop()


def test_html_opens_inline_under_a_policy_and_attempt_logs_download(server, alice, bob, regression, transport):
    # Files where a design run leaves them (its report and an attempt's training log), in a real job folder.
    work = server.data_dir / "jobs" / regression.id
    (work / "artifacts" / "report.html").write_text("<html><body><h1>verdict</h1></body></html>")
    log = work / "run" / "attempts" / "01" / "runs" / "fold0" / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("epoch 1 loss 0.5\n")
    escape = work / "run" / "attempts" / "01" / "escape.log"
    if not escape.is_symlink():
        escape.symlink_to(server.data_dir / "server.log")
    report = httpx.get(f"{server.url}/v1/jobs/{regression.id}/artifacts/report.html", headers=_auth(alice))
    assert report.headers["content-type"] == "text/html; charset=utf-8" and "verdict" in report.text
    assert report.headers["content-disposition"].startswith("inline")
    policy = report.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "sandbox" in policy and "script-src" not in policy
    with server.client(alice, transport) as c:
        assert c.job_logs(regression.id) == ["attempts/01/runs/fold0/train.log"]  # the link out is not listed
        assert c.job_log(regression.id, "attempts/01/runs/fold0/train.log") == "epoch 1 loss 0.5\n"
        with pytest.raises(NotFoundError):
            c.job_log(regression.id, "attempts/01/escape.log")
    with server.client(bob, transport) as c, pytest.raises(NotFoundError):
        c.job_log(regression.id, "attempts/01/runs/fold0/train.log")
    r = httpx.get(f"{server.url}/v1/jobs/{regression.id}/logs/attempts/01/runs/fold0/train.log", headers=_auth(alice))
    assert r.headers["content-type"] == "text/plain; charset=utf-8" and r.headers["x-content-type-options"] == "nosniff"
