"""Tenants from the CLI, authentication on both transports, quotas and rate limits (429 + Retry-After,
RESOURCE_EXHAUSTED), malformed requests answered 4xx while the server keeps serving, and the audit log."""

from __future__ import annotations

import json
import hashlib
import time

import grpc
import httpx
import pytest

from service.protocol.proto.cellforge.v1 import cellforge_pb2 as pb
from service.protocol.proto.cellforge.v1 import cellforge_pb2_grpc as pb_grpc
from service.api.core import AUTH_CACHE_S
from service.client import AuthenticationError, NotFoundError, QuotaError

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _rows(server, query: str) -> list[tuple]:
    from sqlalchemy import text

    from service.db import Database

    db = Database(server.db_url)
    try:
        with db.session() as s:
            return [tuple(r) for r in s.execute(text(query))]
    finally:
        db.dispose()


def test_cli_creates_lists_and_revokes_tenants_with_keys_stored_hashed(server):
    dave = server.cli_tenant("dave", "--max-sandboxes", "3", "--max-memory", "2g")
    listing = json.loads(server.cli("tenants", "list", "--json").stdout.splitlines()[-1])
    names = {t["name"]: t for t in listing["tenants"]}
    assert names["dave"]["max_sandboxes"] == 3 and names["dave"]["max_memory"] == "2g"
    assert dave.key not in json.dumps(listing)
    secret = dave.key.split("_", 2)[2]  # cf_<key id>_<secret>; the secret may hold "_"
    stored = _rows(server, "SELECT * FROM tenants WHERE name = 'dave'")
    assert len(stored) == 1 and not any(secret in str(value) for value in stored[0])
    assert hashlib.sha256(secret.encode()).hexdigest() in stored[0]
    duplicate = server.cli("tenants", "create", "dave", check=False)
    assert duplicate.returncode == 2 and "already exists" in duplicate.stderr, duplicate.stderr
    with server.client(dave) as http, server.client(dave, "grpc") as rpc:
        assert http.list_sandboxes() == rpc.list_sandboxes() == []
        server.cli("tenants", "revoke", "dave")
        time.sleep(AUTH_CACHE_S)  # the server looks a key up again at most this long after it last did
        for client in (http, rpc):
            with pytest.raises(AuthenticationError, match="revoked"):
                client.list_sandboxes()


@pytest.mark.parametrize("header", [None, "Basic abc", "Bearer", "Bearer not-a-key",
                                    "Bearer cf_0123456789abcdef_" + "A" * 43])
def test_http_calls_without_a_valid_key_answer_401(server, header):
    headers = {"Authorization": header} if header else {}
    r = httpx.get(f"{server.url}/v1/sandboxes", headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "Unauthenticated"


def test_grpc_calls_without_a_valid_key_answer_unauthenticated(server, alice):
    stub = pb_grpc.CellForgeStub(grpc.insecure_channel(server.grpc_target))
    wrong = alice.key[:-1] + ("x" if alice.key[-1] != "x" else "y")
    for metadata in [(), (("authorization", "Bearer " + wrong),)]:
        with pytest.raises(grpc.RpcError) as info:
            stub.ListSandboxes(pb.ListRequest(), metadata=metadata)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert stub.ListSandboxes(pb.ListRequest(), metadata=(("authorization", f"Bearer {alice.key}"),)).sandboxes == []


def test_sandbox_count_and_memory_quotas_answer_429_with_retry_after(server, transport):
    tight = server.tenant(f"tight-{transport}", max_sandboxes=1, max_memory='1g')
    with server.client(tight, transport) as c:
        with pytest.raises(QuotaError, match="memory") as info:
            c.create_sandbox(memory="2g")
        assert info.value.retry_after and info.value.retry_after >= 1
        sb = c.create_sandbox(memory="512m")
        with pytest.raises(QuotaError, match="quota 1") as info:
            c.create_sandbox(memory="256m")
        assert info.value.status == 429 and info.value.retry_after >= 1
        c.delete_sandbox(sb.id)
        c.delete_sandbox(c.create_sandbox(memory="512m").id)  # freed by the delete


def test_http_quota_answer_carries_the_retry_after_header(server):
    gpuless = server.tenant("gpuless")
    r = httpx.post(f"{server.url}/v1/sandboxes", headers=_auth(gpuless.key), json={"gpus": 1})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "GPUs" in r.json()["error"]["message"]


def test_rate_limit_answers_429_then_recovers(server, transport):
    slow = server.tenant(f"slow-{transport}", rate_limit=1)
    with server.client(slow, transport) as c:
        errors = []
        for _ in range(6):
            try:
                c.list_sandboxes()
            except QuotaError as exc:
                errors.append(exc)
        assert errors and all(e.retry_after >= 1 for e in errors)
        assert "rate limit" in errors[0].message
        time.sleep(errors[-1].retry_after)
        assert c.list_sandboxes() == []


@pytest.mark.parametrize("body, expected", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"memory": "lots"}', "memory"),
    (b'{"image": "ubuntu:latest"}', "only cellforge-sandbox"),
    (b'{"cpus": -1}', "cpus"),
    (b'{"env": {"LD_PRELOAD": "/x.so"}}', "LD_PRELOAD"),
])
def test_malformed_sandbox_requests_get_a_clear_400(server, alice, body, expected):
    r = httpx.post(f"{server.url}/v1/sandboxes", headers={**_auth(alice.key), "Content-Type": "application/json"},
                   content=body)
    assert r.status_code == 400, r.text
    assert expected in r.json()["error"]["message"]


def test_fields_the_api_does_not_know_get_422_naming_them(server, alice):
    r = httpx.post(f"{server.url}/v1/sandboxes", headers={**_auth(alice.key), "Content-Type": "application/json"},
                   content=b'{"mounts": [{"source": "/etc"}]}')
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "UnknownFields" and "'mounts'" in r.json()["error"]["message"]


def test_malformed_execute_and_unknown_routes_then_the_server_still_serves(server, alice):
    with server.client(alice) as c:
        sb = c.create_sandbox(memory="256m").id
        r = httpx.post(f"{server.url}/v1/sandboxes/{sb}/execute", headers=_auth(alice.key), json={"timeout": 5})
        assert r.status_code == 400 and "code" in r.json()["error"]["message"]
        r = httpx.post(f"{server.url}/v1/sandboxes/{sb}/execute", headers=_auth(alice.key),
                       json={"code": "1", "timeout": -3})
        assert r.status_code == 400 and "timeout" in r.json()["error"]["message"]
        assert httpx.get(f"{server.url}/v1/nothing-here", headers=_auth(alice.key)).status_code == 404
        assert c.execute(sb, "6 * 7").result == "42"
        c.delete_sandbox(sb)
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_follow_sandboxes_and_executions(server, alice):
    before = httpx.get(f"{server.url}/metrics").text
    with server.client(alice) as c:
        sb = c.create_sandbox(memory="256m").id
        c.execute(sb, "1")
        c.execute(sb, "1/0")
        during = httpx.get(f"{server.url}/metrics").text
        c.delete_sandbox(sb)
    after = httpx.get(f"{server.url}/metrics").text
    assert _metric(during, "cellforge_live_sandboxes") == _metric(before, "cellforge_live_sandboxes") + 1
    assert _metric(after, "cellforge_live_sandboxes") == _metric(before, "cellforge_live_sandboxes")
    ok = 'cellforge_executions_total{outcome="ok",transport="http"}'
    error = 'cellforge_executions_total{outcome="error",transport="http"}'
    assert _metric(during, ok) == _metric(before, ok) + 1
    assert _metric(during, error) == _metric(before, error) + 1
    for name in ("cellforge_job_queue_depth", "cellforge_jobs_running", "cellforge_job_duration_seconds"):
        assert name in after


def test_openapi_lists_every_path(server):
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in ("/v1/sandboxes", "/v1/sandboxes/{sandbox_id}/execute", "/v1/datasets", "/v1/jobs",
                 "/v1/jobs/{job_id}/events", "/v1/regressions", "/v1/regressions/{job_id}"):
        assert path in paths


def test_grpc_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(server.grpc_target)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="cellforge.v1.CellForge"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "cellforge.v1.CellForge" in {s.name for s in answer.list_services_response.service}


def test_the_audit_log_records_who_did_what(server, alice, bob):
    with server.client(alice) as c:
        c.delete_sandbox(c.create_sandbox(memory="256m").id)
    with server.client(bob) as c:
        with pytest.raises(NotFoundError):
            c.get_sandbox("feedfacefeed")
    assert httpx.get(f"{server.url}/v1/sandboxes", headers=_auth("cf_not_a_key")).status_code == 401
    time.sleep(0.8)  # entries are flushed in batches
    rows = _rows(server, "SELECT t.name, a.transport, a.action, a.resource, a.outcome FROM audit_log a "
                         "LEFT JOIN tenants t ON t.id = a.tenant_id")
    assert ("bob", "http", "sandbox.get", "feedfacefeed", "NotFound") in rows
    assert any(r[0] == "alice" and r[2] == "sandbox.create" and r[4] == "ok" for r in rows)
    assert any(r[0] is None and r[4] == "Unauthenticated" for r in rows)
