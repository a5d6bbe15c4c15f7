"""A request h11 cannot parse is answered in the API's one error shape (JSON), not uvicorn's plain text,
by a real uvicorn server on loopback with the service's connection protocol."""

from __future__ import annotations

import json
import socket
import threading
import time

import uvicorn

from service.api.connections import ConnectionLimits, guarded_protocol


async def _app(scope, receive, send) -> None:  # never reached by an unparsable request
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _answer(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


def test_unparsable_requests_get_a_json_400_and_the_server_serves_on() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(
        _app, host="127.0.0.1", port=port, log_level="critical", lifespan="off",
        http=guarded_protocol(ConnectionLimits()), h11_max_incomplete_event_size=1024))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        # Garbage, and a request head that outgrows the head limit before it ends.
        for raw in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 4096):
            head, _, body = _answer(port, raw).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400"), head
            assert b"content-type: application/json" in head.lower(), head
            error = json.loads(body)["error"]
            assert error["type"] == "BadRequest" and error["message"], error
        served = _answer(port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert served.startswith(b"HTTP/1.1 200") and b"\r\nok\r\n" in served, served
    finally:
        server.should_exit = True
        thread.join(10)
