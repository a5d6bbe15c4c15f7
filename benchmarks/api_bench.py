"""API benchmark: execute overhead of HTTP and gRPC over a direct in-process sandbox call (p50), many
concurrent clients executing for a while (errors must be zero), and memory per idle sandbox.

Starts its own `cellforge serve` on free loopback ports with a fresh data dir; prints one JSON object.

    .venv/bin/python benchmarks/api_bench.py [--calls 200] [--clients 50] [--sandboxes 10] [--duration 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import grpc
import httpx

from sandbox import DockerBackend, SandboxSpec
from service.protocol.proto.cellforge.v1 import cellforge_pb2 as pb
from service.protocol.proto.cellforge.v1 import cellforge_pb2_grpc as pb_grpc
from service.client import CellForgeClient

CODE = "x = 1"
CLI = str(Path(sys.executable).parent / "cellforge")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


async def latencies(url: str, target: str, key: str, calls: int, block: int = 20) -> dict[str, list[float]]:
    """Sequential executions of the same code directly on an in-process sandbox, through HTTP (NDJSON
    stream read to the end) and through gRPC, interleaved in blocks so that all three see the same load."""
    backend = DockerBackend()
    direct = await backend.create(SandboxSpec(memory="256m"))
    headers = {"Authorization": f"Bearer {key}"}
    metadata = (("authorization", f"Bearer {key}"),)
    out: dict[str, list[float]] = {"direct": [], "http": [], "grpc": []}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http, \
            grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CellForgeStub(channel)
        sb_http = (await http.post("/v1/sandboxes", json={"memory": "256m"})).json()["id"]
        created = await stub.CreateSandbox(pb.CreateSandboxRequest(spec=pb.SandboxSpec(memory="256m")), metadata=metadata)
        sb_grpc = created.id

        async def via_direct() -> None:
            assert (await direct.execute(CODE)).ok

        async def via_http() -> None:
            async with http.stream("POST", f"/v1/sandboxes/{sb_http}/execute", json={"code": CODE}) as r:
                lines = [line async for line in r.aiter_lines() if line]
            assert json.loads(lines[-1])["result"]["outcome"] == "ok"

        async def via_grpc() -> None:
            events = [e async for e in stub.Execute(pb.ExecuteRequest(sandbox_id=sb_grpc, code=CODE),
                                                    metadata=metadata)]
            assert events[-1].result.outcome == "ok"

        try:
            runners = {"direct": via_direct, "http": via_http, "grpc": via_grpc}
            for run in runners.values():
                await run()  # warm-up
            while len(out["direct"]) < calls:
                for name, run in runners.items():
                    for _ in range(min(block, calls - len(out[name]))):
                        t = time.perf_counter()
                        await run()
                        out[name].append((time.perf_counter() - t) * 1000)
        finally:
            await direct.close()
            await http.delete(f"/v1/sandboxes/{sb_http}")
            await stub.DeleteSandbox(pb.SandboxRef(sandbox_id=sb_grpc), metadata=metadata)
    return out


async def load(url: str, target: str, key: str, sandboxes: list[str], clients: int, duration: float) -> dict:
    """`clients` concurrent callers (half HTTP, half gRPC) executing on the sandboxes round-robin."""
    headers = {"Authorization": f"Bearer {key}"}
    metadata = (("authorization", f"Bearer {key}"),)
    deadline = time.monotonic() + duration
    counts = {"http": 0, "grpc": 0}
    errors: list[str] = []
    latencies: list[float] = []

    async def http_client(sandbox: str, http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            t = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/sandboxes/{sandbox}/execute", json={"code": CODE}, headers=headers)
                last = json.loads(r.text.strip().splitlines()[-1])
                if r.status_code != 200 or last.get("kind") != "done" or last["result"]["outcome"] != "ok":
                    errors.append(f"http {r.status_code}: {r.text[:200]}")
                    continue
            except Exception as exc:  # noqa: BLE001 - every failure counts as an error of the run
                errors.append(f"http {type(exc).__name__}: {exc}")
                continue
            latencies.append((time.perf_counter() - t) * 1000)
            counts["http"] += 1

    async def grpc_client(sandbox: str, stub: pb_grpc.CellForgeStub) -> None:
        while time.monotonic() < deadline:
            t = time.perf_counter()
            try:
                events = [e async for e in stub.Execute(pb.ExecuteRequest(sandbox_id=sandbox, code=CODE),
                                                        metadata=metadata)]
                if events[-1].kind != "done" or events[-1].result.outcome != "ok":
                    errors.append(f"grpc: {events[-1]}")
                    continue
            except Exception as exc:  # noqa: BLE001
                errors.append(f"grpc {type(exc).__name__}: {exc}")
                continue
            latencies.append((time.perf_counter() - t) * 1000)
            counts["grpc"] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http, grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CellForgeStub(channel)
        tasks = []
        for i in range(clients):
            sandbox = sandboxes[i % len(sandboxes)]
            tasks.append(http_client(sandbox, http) if i % 2 == 0 else grpc_client(sandbox, stub))
        started = time.monotonic()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    total = counts["http"] + counts["grpc"]
    return {"clients": clients, "sandboxes": len(sandboxes), "seconds": round(elapsed, 1), "executions": total,
            "executions_per_s": round(total / elapsed, 1), "by_transport": counts, "errors": len(errors),
            "first_errors": errors[:5], "latency_ms_p50": _pct(latencies, 0.5) if latencies else None,
            "latency_ms_p99": _pct(latencies, 0.99) if latencies else None}


def idle_memory(sandbox_ids: list[str]) -> dict:
    """Memory the idle sandboxes' containers use (cgroup usage less page cache), per sandbox."""
    client = docker.from_env()
    used = []
    for sid in sandbox_ids:
        stats = client.containers.get(f"cellforge-{sid}").stats(stream=False)["memory_stats"]
        cache = stats.get("stats", {}).get("inactive_file", 0)
        used.append((stats["usage"] - cache) / (1 << 20))
    return {"sandboxes": len(used), "mib_per_idle_sandbox_mean": round(statistics.mean(used), 1),
            "mib_per_idle_sandbox_max": round(max(used), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="sequential executions per latency series")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--sandboxes", type=int, default=10, help="sandboxes the concurrent clients share")
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="cellforge-bench-"))
    http_port, grpc_port = _port(), _port()
    created = subprocess.run([CLI, "tenants", "create", "bench", "--data-dir", str(data_dir), "--json",
                              "--max-sandboxes", str(args.sandboxes + 2), "--max-memory", "64g", "--max-cpus", str(args.sandboxes + 2),
                              "--rate-limit", "100000"], capture_output=True, text=True, check=True)
    key = json.loads(created.stdout.strip().splitlines()[-1])["api_key"]
    server = subprocess.Popen([CLI, "serve", "--data-dir", str(data_dir), "--http-port", str(http_port),
                               "--grpc-port", str(grpc_port), "--warm", "0", "--preload", ""],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        series = asyncio.run(latencies(url, target, key, args.calls))
        with CellForgeClient(url, key) as http_client:
            sandboxes = [http_client.create_sandbox(memory="256m").id for _ in range(args.sandboxes)]
            time.sleep(3)  # let the fresh kernels settle before measuring them idle
            memory = idle_memory(sandboxes)
            concurrent = asyncio.run(load(url, target, key, sandboxes, args.clients, args.duration))
            for sb in sandboxes:
                http_client.delete_sandbox(sb)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(data_dir, ignore_errors=True)
    p50 = {name: _pct(values, 0.5) for name, values in series.items()}
    print(json.dumps({
        "execute_ms_p50": p50,
        "execute_ms_p99": {name: _pct(values, 0.99) for name, values in series.items()},
        "overhead_ms_p50": {name: round(p50[name] - p50["direct"], 3) for name in ("http", "grpc")},
        "calls": args.calls,
        "concurrent": concurrent,
        "idle_memory": memory,
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
