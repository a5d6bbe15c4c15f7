"""Sandboxes through a real server: streaming over HTTP (NDJSON, SSE) and gRPC, files, interrupt on
disconnect, restart, and every sandbox call tried by another tenant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest

from service.protocol.proto.cellforge.v1 import cellforge_pb2 as pb
from service.protocol.proto.cellforge.v1 import cellforge_pb2_grpc as pb_grpc
from service.client import APIError, NotFoundError

CLI = [str(Path(sys.executable).parent / "cellforge")]

pytestmark = [pytest.mark.docker, pytest.mark.slow]

LOOP = "import time\ni = 0\nprint('started', flush=True)\nwhile True:\n    i += 1\n    time.sleep(0.01)\n"


@pytest.fixture(scope="module")
def alice_sandbox(server, alice):
    with server.client(alice) as c:
        sb = c.create_sandbox(memory="512m")
        yield sb.id
        c.delete_sandbox(sb.id)


def test_execute_streams_events_live_then_the_result(server, alice, alice_sandbox, transport):
    with server.client(alice, transport) as c:
        code = "import time\nfor k in range(3):\n    print(k, flush=True)\n    time.sleep(0.4)\n40 + 2"
        arrivals, events = [], []
        for event in c.stream(alice_sandbox, code):
            arrivals.append(time.monotonic())
            events.append(event)
    kinds = [e["kind"] for e in events]
    assert kinds == ["stdout", "stdout", "stdout", "result", "done"]
    assert [e["text"] for e in events[:3]] == ["0\n", "1\n", "2\n"]
    # Live: the first line arrived well before the last, not all at once at the end.
    assert arrivals[2] - arrivals[0] > 0.6
    assert events[-1]["result"]["outcome"] == "ok"
    assert events[-1]["result"]["result"] == "42"


def test_run_script_remotely_as_the_cli_does(server, alice, transport):
    from sandbox import StdoutEvent
    from service.client.remote import run_script

    seen = []
    url = server.url if transport == "http" else server.grpc_target
    sandbox_id, res = run_script(url, alice.key, "print('remote', flush=True)\n2 ** 10", transport=transport,
                     on_event=seen.append, memory="256m", timeout=30)
    assert res.outcome.value == "ok" and res.result == "1024"
    assert isinstance(seen[0], StdoutEvent) and seen[0].text == "remote\n"
    with server.client(alice, transport) as c:
        with pytest.raises(NotFoundError):
            c.get_sandbox(sandbox_id)  # deleted afterwards


def test_errors_come_back_as_results_with_the_traceback(server, alice, alice_sandbox, transport):
    with server.client(alice, transport) as c:
        res = c.execute(alice_sandbox, "def f():\n    raise KeyError('missing-key')\nf()")
    assert res.outcome.value == "error"
    assert res.ename == "KeyError" and "missing-key" in res.evalue
    assert any("f()" in line for line in res.traceback)


def test_sse_stream(server, alice, alice_sandbox):
    with httpx.stream("POST", f"{server.url}/v1/sandboxes/{alice_sandbox}/execute",
                      headers={"Authorization": f"Bearer {alice.key}", "Accept": "text/event-stream"},
                      json={"code": "print('sse')"}, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    frames = [f for f in body.split("\n\n") if f.strip()]
    assert frames[0].startswith("event: stdout\ndata: ")
    assert json.loads(frames[0].split("data: ", 1)[1])["text"] == "sse\n"
    assert frames[-1].startswith("event: done")
    assert json.loads(frames[-1].split("data: ", 1)[1])["result"]["outcome"] == "ok"


def test_a_disconnecting_client_interrupts_its_execution(server, alice, alice_sandbox, transport):
    with server.client(alice, transport) as c:
        stream = c.stream(alice_sandbox, LOOP, timeout=120)
        assert next(stream)["text"] == "started\n"
        stream.close()  # the client goes away mid-execution
        # The kernel is free again at once (the loop was interrupted, not left running for 120 s)
        # and the loop counter no longer moves.
        first = c.execute(alice_sandbox, "i", timeout=10)
        time.sleep(0.3)
        second = c.execute(alice_sandbox, "i", timeout=10)
    assert first.outcome.value == "ok" and first.result == second.result


def test_interrupt_and_restart(server, alice, alice_sandbox):
    with server.client(alice) as c:
        import threading

        results = []
        worker = threading.Thread(target=lambda: results.append(c.execute(alice_sandbox, LOOP, timeout=60)))
        worker.start()
        time.sleep(1.0)
        c.interrupt(alice_sandbox)
        worker.join(20)
        assert results and results[0].outcome.value == "error" and results[0].ename == "KeyboardInterrupt"
        c.execute(alice_sandbox, "kept = 1")
        c.restart(alice_sandbox)
        after = c.execute(alice_sandbox, "kept")
    assert after.outcome.value == "error" and after.ename == "NameError"


PLANT_DYING_STARTUP = (
    "import os; d = '/tmp/.ipython/profile_default/startup'; os.makedirs(d, exist_ok=True)\n"
    "open(d + '/00-die.py', 'w').write('import os; os._exit(7)')"
)


def test_a_failed_restart_is_a_clear_error_and_the_sandbox_shows_dead(server, alice, transport):
    # Sandboxed code makes every new kernel die at boot: the restart fails. Before, that was a 500 and
    # the sandbox still showed `live`.
    with server.client(alice, transport) as c:
        sandbox_id = c.create_sandbox(memory="512m").id
        try:
            assert c.execute(sandbox_id, PLANT_DYING_STARTUP).outcome.value == "ok"
            with pytest.raises(APIError) as failed:
                c.restart(sandbox_id)
            assert failed.value.status == 503 and "exit code 7" in failed.value.message
            assert c.get_sandbox(sandbox_id).status == "dead"
            # Refused inside the execution stream (its headers are sent): the same status as any refusal.
            with pytest.raises(APIError) as refused:
                c.execute(sandbox_id, "1 + 1")
            assert refused.value.status == 409 and "exit code 7" in refused.value.message, refused.value
            c.restart(sandbox_id)  # a fresh container: the planted file went with the old /tmp
            assert c.get_sandbox(sandbox_id).status == "live"
            assert c.execute(sandbox_id, "6 * 7").result == "42"
        finally:
            c.delete_sandbox(sandbox_id)


def test_files_round_trip_and_bad_paths(server, alice, alice_sandbox, transport):
    payload = bytes(range(256)) * 100
    with server.client(alice, transport) as c:
        c.put_file(alice_sandbox, f"in/{transport}.bin", payload)
        assert c.get_file(alice_sandbox, f"in/{transport}.bin") == payload
        res = c.execute(alice_sandbox, f"import os; os.path.getsize('in/{transport}.bin')")
        assert res.result == str(len(payload))
        with pytest.raises(NotFoundError, match="No such file"):
            c.get_file(alice_sandbox, "absent.txt")
    r = httpx.get(f"{server.url}/v1/sandboxes/{alice_sandbox}/files/a/../../etc/passwd",
                  headers={"Authorization": f"Bearer {alice.key}"})
    assert r.status_code in (400, 404)


def test_another_tenant_gets_404_on_every_sandbox_call(server, alice, bob, alice_sandbox):
    headers = {"Authorization": f"Bearer {bob.key}"}
    calls = [
        ("GET", f"/v1/sandboxes/{alice_sandbox}", None),
        ("DELETE", f"/v1/sandboxes/{alice_sandbox}", None),
        ("POST", f"/v1/sandboxes/{alice_sandbox}/execute", {"code": "1"}),
        ("POST", f"/v1/sandboxes/{alice_sandbox}/interrupt", None),
        ("POST", f"/v1/sandboxes/{alice_sandbox}/restart", None),
        ("PUT", f"/v1/sandboxes/{alice_sandbox}/files/x.txt", b"x"),
        ("GET", f"/v1/sandboxes/{alice_sandbox}/files/in/http.bin", None),
    ]
    for method, path, body in calls:
        kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
        theirs = httpx.request(method, server.url + path, headers=headers, **kwargs)
        absent = httpx.request(method, server.url + path.replace(alice_sandbox, "0123456789ab"), headers=headers,
                               **kwargs)
        assert theirs.status_code == absent.status_code == 404, (method, path, theirs.text)
        # Indistinguishable from a missing id: same shape, the id named as asked.
        assert theirs.json()["error"]["type"] == absent.json()["error"]["type"] == "NotFound"
    with httpx.Client(headers=headers) as h:
        assert alice_sandbox not in {s["id"] for s in h.get(f"{server.url}/v1/sandboxes").json()["sandboxes"]}

    stub = pb_grpc.CellForgeStub(grpc.insecure_channel(server.grpc_target))
    md = (("authorization", f"Bearer {bob.key}"),)
    grpc_calls = [
        lambda: stub.GetSandbox(pb.SandboxRef(sandbox_id=alice_sandbox), metadata=md),
        lambda: stub.DeleteSandbox(pb.SandboxRef(sandbox_id=alice_sandbox), metadata=md),
        lambda: list(stub.Execute(pb.ExecuteRequest(sandbox_id=alice_sandbox, code="1"), metadata=md)),
        lambda: stub.Interrupt(pb.SandboxRef(sandbox_id=alice_sandbox), metadata=md),
        lambda: stub.Restart(pb.SandboxRef(sandbox_id=alice_sandbox), metadata=md),
        lambda: stub.PutFile(pb.PutFileRequest(sandbox_id=alice_sandbox, path="x", data=b"x"), metadata=md),
        lambda: stub.GetFile(pb.FileRef(sandbox_id=alice_sandbox, path="in/http.bin"), metadata=md),
    ]
    for call in grpc_calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
    # Alice's sandbox is untouched by all of it.
    with server.client(alice) as c:
        assert c.execute(alice_sandbox, "1 + 1").result == "2"


def test_idle_sandboxes_are_reaped_and_free_their_quota(tmp_path, docker_image, make_server):
    server = make_server(tmp_path, "--idle-timeout", "2").start()
    try:
        solo = server.tenant("solo", max_sandboxes=1)
        with server.client(solo) as c:
            sb = c.create_sandbox(memory="256m").id
            assert c.execute(sb, "1").outcome.value == "ok"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and c.list_sandboxes():
                time.sleep(0.5)
            with pytest.raises(NotFoundError):
                c.get_sandbox(sb)
            c.delete_sandbox(c.create_sandbox(memory="256m").id)  # the quota place came back
    finally:
        server.stop()


def test_cli_sandbox_run_targets_a_remote_server(server, alice, tmp_path):
    script = tmp_path / "remote.py"
    script.write_text("print('from the server', flush=True)\n")
    env = {**os.environ, "CELLFORGE_API_KEY": alice.key}
    done = subprocess.run([*CLI, "sandbox", "run", str(script), "--server", server.url, "--memory", "256m", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "from the server" in done.stdout
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["outcome"] == "ok" and summary["backend"] == "remote" and summary["isolated"] is True
    with server.client(alice) as c:  # the CLI's sandbox was deleted afterwards
        with pytest.raises(NotFoundError):
            c.get_sandbox(summary["sandbox_id"])

    refused = subprocess.run([*CLI, "sandbox", "run", str(script), "--server", server.url, "--api-key", "cf_bad_key"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 3 and "refused" in refused.stderr
