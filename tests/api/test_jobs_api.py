"""Jobs and regression runs through a real server: a pytest regression with per-test results and JUnit
XML, events, cancel, the job quota, malformed requests, and every job call tried by another tenant."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET

import grpc
import httpx
import pytest

from service.protocol.proto.cellforge.v1 import cellforge_pb2 as pb
from service.protocol.proto.cellforge.v1 import cellforge_pb2_grpc as pb_grpc
from service.client import InvalidRequestError, NotFoundError, QuotaError
from service.data import simulate

from .conftest import bundle

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SUITE = {
    "test_model.py": (
        "import anndata\n\n"
        "def test_arithmetic():\n    assert 1 + 1 == 2\n\n"
        "def test_broken():\n    assert 2 + 2 == 5, 'arithmetic broke'\n\n"
        "def test_reads_the_mounted_data():\n    assert anndata.read_h5ad('/data/screen.h5ad').n_obs == 1500\n"
    ),
}


@pytest.fixture(scope="module")
def screen_id(server, alice, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "screen.h5ad"
    simulate("knockout", 0, n_cells=1500, n_genes=50).write_h5ad(path)
    with server.client(alice) as c:
        return c.upload_dataset(path).id


@pytest.fixture(scope="module")
def finished_regression(server, alice, screen_id):
    with server.client(alice) as c:
        run = c.submit_regression(kind="pytest", bundle_zip_b64=bundle(SUITE), dataset_id=screen_id, timeout=120)
        assert run.status == "queued" and run.kind == "regression.pytest"
        return c.wait(run.id, timeout=180)


def test_pytest_regression_reports_each_test(server, alice, finished_regression, transport):
    with server.client(alice, transport) as c:
        run = c.get_regression(finished_regression.id)
        assert run.status == "succeeded", run
        result = run.result
        assert result["passed"] is False and result["exit_code"] == 1
        outcomes = {t["name"]: t["outcome"] for t in result["tests"]}
        assert outcomes == {"test_arithmetic": "passed", "test_broken": "failed",
                            "test_reads_the_mounted_data": "passed"}
        assert "arithmetic broke" in next(t["message"] for t in result["tests"] if t["name"] == "test_broken")
        assert result["summary"] == {"total": 3, "passed": 2, "failed": 1, "error": 0, "skipped": 0}
        assert set(run.artifacts) == {"junit.xml", "results.json"}
        junit = ET.fromstring(c.get_artifact(run.id, "junit.xml"))
        assert len(list(junit.iter("testcase"))) == 3
        assert json.loads(c.get_artifact(run.id, "results.json"))["summary"]["failed"] == 1
        with pytest.raises(NotFoundError, match="no artifact"):
            c.get_artifact(run.id, "model.pt")
        with pytest.raises(NotFoundError):
            c.get_artifact(run.id, "../../cellforge.db")


def test_job_events_replay_the_run_in_order(server, alice, finished_regression, transport):
    with server.client(alice, transport) as c:
        events = list(c.job_events(finished_regression.id))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    phases = [e.data["phase"] for e in events if e.kind == "phase"]
    assert phases == ["sandbox", "upload", "pytest"]
    statuses = [e.data["status"] for e in events if e.kind == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert any(e.kind == "output" and "1 failed" in (e.data.get("text") or "") for e in events)
    with server.client(alice, transport) as c:
        later = list(c.job_events(finished_regression.id, after_seq=events[-2].seq))
    assert [e.seq for e in later] == [events[-1].seq]


def test_job_events_as_server_sent_events(server, alice, finished_regression):
    with httpx.stream("GET", f"{server.url}/v1/jobs/{finished_regression.id}/events",
                      headers={"Authorization": f"Bearer {alice.key}", "Accept": "text/event-stream"}) as r:
        frames = [f for f in r.read().decode().split("\n\n") if f.strip()]
    first = frames[0].splitlines()
    assert first[0] == "id: 1" and first[1] == "event: status"
    assert json.loads(first[2].removeprefix("data: "))["data"] == {"status": "queued"}
    assert frames[-1].splitlines()[1] == "event: status"


def test_running_jobs_stream_events_live_and_can_be_cancelled(server, alice, transport):
    slow = {"test_slow.py": "import time\n\ndef test_sleeps():\n    print('sleeping', flush=True)\n"
                            "    time.sleep(60)\n"}
    with server.client(alice, transport) as c:
        run = c.submit_regression(kind="pytest", bundle_zip_b64=bundle(slow), timeout=120)
        seen = []
        for event in c.job_events(run.id):
            seen.append(event)
            if event.kind == "phase" and event.data["phase"] == "pytest":
                break
        cancelled = c.cancel_job(run.id)
        final = c.wait(run.id, timeout=30)
    assert final.status == "cancelled" and final.error == "cancelled by its tenant"
    assert cancelled.id == run.id


def test_job_quota_and_cancelling_a_queued_job(server, transport):
    solo = server.tenant(f"solo-{transport}", max_jobs=1)
    slow = {"test_slow.py": "import time\n\ndef test_sleeps():\n    time.sleep(30)\n"}
    with server.client(solo, transport) as c:
        first = c.submit_regression(kind="pytest", bundle_zip_b64=bundle(slow))
        with pytest.raises(QuotaError, match="quota 1") as info:
            c.submit_regression(kind="pytest", bundle_zip_b64=bundle(slow))
        assert info.value.retry_after >= 1
        c.cancel_job(first.id)
        assert c.wait(first.id, timeout=30).status == "cancelled"
        # Its place is free again.
        second = c.submit_regression(kind="pytest", bundle_zip_b64=bundle(slow))
        c.cancel_job(second.id)
        assert c.wait(second.id, timeout=30).status == "cancelled"


@pytest.mark.parametrize("request_body, expected", [
    ({"kind": "fuzz"}, "expected 'pytest', 'rescore' or 'replay'"),
    ({"kind": "pytest"}, "exactly one of bundle_zip_b64 or job_id"),
    ({"kind": "pytest", "bundle_zip_b64": "%%%"}, "not valid base64"),
    ({"kind": "pytest", "bundle_zip_b64": base64.b64encode(b"plain text").decode()}, "not a zip"),
    ({"kind": "pytest", "bundle_zip_b64": bundle({"../escape.py": "x"})}, "escapes the bundle folder"),
    ({"kind": "rescore"}, "job_id"),
])
def test_malformed_regression_requests_get_400(server, alice, request_body, expected):
    with server.client(alice) as c:
        with pytest.raises(InvalidRequestError) as info:
            c.submit_regression(**request_body)
    assert info.value.status == 400 and expected in info.value.message


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_unknown_options_are_refused_by_name_not_dropped(server, alice, screen_id, transport):
    with server.client(alice, transport) as c:
        before = len(c.list_jobs())
        with pytest.raises(InvalidRequestError, match="max_minute") as design:
            c.submit_job(screen_id, "predict knockouts", max_minute=5)
        with pytest.raises(InvalidRequestError, match="surprise") as regression:
            c.submit_regression(kind="pytest", bundle_zip_b64=bundle(SUITE), surprise=1)
        assert len(c.list_jobs()) == before  # nothing was queued
    # Over gRPC the typed request has no such field: the client refuses it before any call, as HTTP answers.
    assert design.value.status == regression.value.status == 422
    assert design.value.kind == regression.value.kind == "UnknownFields"


def test_grpc_requests_are_typed_so_integers_stay_integers(server, alice, screen_id):
    with server.client(alice, "grpc") as c:
        job = c.submit_job(screen_id, "predict knockouts", seed=3, max_attempts=2, max_minutes=1.5)
        c.cancel_job(job.id)
        sandbox = c.create_sandbox(gpus=0, timeout=30, env={"A": "1"})
        c.delete_sandbox(sandbox.id)
    options = job.params["options"]
    assert {k: options[k] for k in ("seed", "max_attempts", "max_minutes")} == {"seed": 3, "max_attempts": 2,
                                                                              "max_minutes": 1.5}
    assert type(options["seed"]) is int and type(options["max_attempts"]) is int
    assert type(sandbox.spec["gpus"]) is int and sandbox.spec["env"] == {"A": "1"}


# Routes answering JSON, and the model each answers with (the others stream or send files).
JSON_ANSWERS = {
    ("post", "/v1/sandboxes"): "SandboxInfo", ("get", "/v1/sandboxes"): "SandboxList",
    ("get", "/v1/sandboxes/{sandbox_id}"): "SandboxInfo",
    ("post", "/v1/sandboxes/{sandbox_id}/interrupt"): "SandboxStatus",
    ("post", "/v1/sandboxes/{sandbox_id}/restart"): "SandboxStatus",
    ("post", "/v1/datasets"): "DatasetInfo", ("get", "/v1/datasets"): "DatasetList",
    ("post", "/v1/jobs"): "JobInfo", ("get", "/v1/jobs"): "JobList", ("get", "/v1/jobs/{job_id}"): "JobInfo",
    ("post", "/v1/jobs/{job_id}/cancel"): "JobInfo", ("post", "/v1/regressions"): "JobInfo",
    ("get", "/v1/regressions/{job_id}"): "JobInfo", ("get", "/v1/sandboxes/{sandbox_id}/files"): "FileList",
    ("post", "/v1/sandboxes/{sandbox_id}/commands"): "ExecutionResult",
    ("get", "/v1/datasets/sha256/{digest}"): "DatasetInfo", ("get", "/v1/jobs/{job_id}/logs"): "JobLogs",
}


def test_openapi_documents_bodies_answers_and_the_bearer_scheme(server, alice):
    spec = httpx.get(f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {alice.key}"}).json()
    operations = {(method, path): op for path, ops in spec["paths"].items() for method, op in ops.items()}
    for (method, path), model in JSON_ANSWERS.items():
        answer = next(r for code, r in operations[method, path]["responses"].items() if code.startswith("2"))
        assert answer["content"]["application/json"]["schema"]["$ref"].endswith(f"/{model}"), (method, path)
    assert all(op["security"] == [{"HTTPBearer": []}] for (_, path), op in operations.items() if path.startswith("/v1"))
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    submit = operations["post", "/v1/jobs"]["requestBody"]["content"]["application/json"]["schema"]
    assert submit["$ref"].endswith("/DesignJobRequest")
    regression = operations["post", "/v1/regressions"]["requestBody"]["content"]["application/json"]["schema"]
    assert sorted(r["$ref"].rsplit("/", 1)[1] for r in regression["oneOf"]) == ["CompareRegression", "PytestRegression"]
    assert regression["discriminator"]["propertyName"] == "kind"
    # Errors are documented as they are answered: ErrorBody, never FastAPI's {"detail": ...}.
    assert all(op["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
               and "422" not in op["responses"] for op in operations.values())
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    options = spec["components"]["schemas"]["DesignOptions"]
    assert options["additionalProperties"] is False and "max_minutes" in options["properties"]


def test_design_job_requests_are_checked(server, alice, bob, screen_id):
    with server.client(alice) as c:
        with pytest.raises(InvalidRequestError, match="task"):
            c.submit_job(screen_id, "  ")
        with pytest.raises(InvalidRequestError, match="max_attempts"):
            c.submit_job(screen_id, "predict knockouts", max_attempts=0)
        with pytest.raises(InvalidRequestError, match="scheme"):
            c.submit_job(screen_id, "predict knockouts", scheme="unseen-gene")
        with pytest.raises(QuotaError, match="GPUs"):
            c.submit_job(screen_id, "predict knockouts", gpus=2)
    with server.client(bob) as c:
        with pytest.raises(NotFoundError, match="no dataset"):
            c.submit_job(screen_id, "predict knockouts")


def test_another_tenant_gets_404_on_every_job_call(server, bob, finished_regression):
    job = finished_regression.id
    headers = {"Authorization": f"Bearer {bob.key}"}
    for method, path in [("GET", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/events"),
                         ("POST", f"/v1/jobs/{job}/cancel"), ("GET", f"/v1/jobs/{job}/artifacts/junit.xml"),
                         ("GET", f"/v1/regressions/{job}")]:
        theirs = httpx.request(method, server.url + path, headers=headers)
        absent = httpx.request(method, server.url + path.replace(job, "job_0000000000000000"), headers=headers)
        assert theirs.status_code == absent.status_code == 404, (method, path)
        assert theirs.json()["error"]["type"] == absent.json()["error"]["type"] == "NotFound"
    assert job not in {j["id"] for j in httpx.get(f"{server.url}/v1/jobs", headers=headers).json()["jobs"]}
    stub = pb_grpc.CellForgeStub(grpc.insecure_channel(server.grpc_target))
    md = (("authorization", f"Bearer {bob.key}"),)
    for call in [lambda: stub.GetJob(pb.JobRef(job_id=job), metadata=md),
                 lambda: list(stub.JobEvents(pb.JobEventsRequest(job_id=job), metadata=md)),
                 lambda: stub.CancelJob(pb.JobRef(job_id=job), metadata=md),
                 lambda: list(stub.GetArtifact(pb.ArtifactRef(job_id=job, name="junit.xml"), metadata=md)),
                 lambda: stub.GetRegression(pb.JobRef(job_id=job), metadata=md)]:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
    # Nor can another tenant build a regression on it.
    with httpx.Client(headers=headers) as h:
        r = h.post(f"{server.url}/v1/regressions", json={"kind": "pytest", "job_id": job})
        assert r.status_code == 404
