"""Hostile-traffic benchmark: what a caller without a key and a flood of half-sent requests cost the server.

- a large body without a key (the security review sent 400 MB): the answer, how much of the body the
  server took before closing, and how much its memory grew;
- many connections that send half a request line: the server's open file descriptors at the peak and
  after the header timeout, and a normal client's latency meanwhile;
- how many log lines all that added.

Starts its own `cellforge serve` on free loopback ports with a fresh data dir; prints one JSON object.

    .venv/bin/python benchmarks/hostile_bench.py [--body-mb 400] [--half-open 5000] [--header-timeout 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

CLI = str(Path(sys.executable).parent / "cellforge")
MB = 1 << 20


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def unauthenticated_body(port: int, size: int) -> dict:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST /v1/datasets HTTP/1.1\r\nHost: b\r\nContent-Length: {size}\r\n\r\n".encode())
    sent = [0]

    def pump() -> None:
        block = b"\0" * MB
        try:
            while sent[0] < size:
                sock.sendall(block)
                sent[0] += MB
        except OSError:
            pass

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    thread.join(30)
    sock.close()
    return {"status": int(answer.split()[1]) if answer else None, "sent_mb": round(sent[0] / MB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--body-mb", type=int, default=400)
    parser.add_argument("--half-open", type=int, default=5000)
    parser.add_argument("--header-timeout", type=float, default=2.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.half_open + 1024)), hard))

    data = Path(tempfile.mkdtemp(prefix="cf-hostile-"))
    http_port = _port()
    log = (data / "server.log").open("wb")
    server = subprocess.Popen([CLI, "serve", "--data-dir", str(data), "--http-port", str(http_port), "--grpc-port",
                               "0", "--warm", "0", "--preload", "", "--header-timeout", str(args.header_timeout)],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        lines_before = len((data / "server.log").read_text().splitlines())
        unauthenticated_body(http_port, MB)  # warm
        rss_before = _rss(server.pid)
        body = unauthenticated_body(http_port, args.body_mb * MB)
        body["rss_growth_mb"] = round((_rss(server.pid) - rss_before) / MB, 1)

        fds_before = _fds(server.pid)
        half_open, refused, latencies, stop = [], 0, [], threading.Event()

        def probe() -> None:  # a normal client from another address, all through the flood
            with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10) as normal:
                while not stop.is_set():
                    t = time.perf_counter()
                    normal.get(f"{url}/healthz").raise_for_status()
                    latencies.append((time.perf_counter() - t) * 1000)
                    time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        for _ in range(args.half_open):
            try:
                sock = socket.create_connection(("127.0.0.1", http_port), timeout=5)
                sock.sendall(b"GET /hea")
                half_open.append(sock)
            except OSError:
                refused += 1
        fds_peak = _fds(server.pid)
        time.sleep(args.header_timeout + 1.5)
        stop.set()
        prober.join(30)
        fds_after = _fds(server.pid)
        still_open = 0
        for sock in half_open:
            sock.setblocking(False)
            try:
                still_open += sock.recv(1) != b""
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
            sock.close()
        lines_added = len((data / "server.log").read_text().splitlines()) - lines_before
        print(json.dumps({
            "unauthenticated_body": {"mb": args.body_mb, **body},
            "half_open": {"clients": args.half_open, "connect_refused": refused, "server_fds_before": fds_before,
                          "server_fds_peak": fds_peak, "server_fds_after_timeout": fds_after,
                          "still_open_after_timeout": still_open, "header_timeout_s": args.header_timeout},
            "normal_client_ms": {"p50": round(statistics.median(latencies), 2), "max": round(max(latencies), 2),
                                 "calls": len(latencies)},
            "log_lines_added": lines_added,
        }, indent=1))
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
