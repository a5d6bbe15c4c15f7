"""What the gRPC server's fixed flow-control window costs an upload: one large message sent through a loopback
proxy that delays every byte by half a round trip each way, to a grpc.aio server with `GrpcLimits`' options
(a fixed window, `stream_window_bytes`) and with the same options but gRPC's default BDP probing (a window
that grows on a fast link). The fixed window bounds what a refused, unauthenticated message costs the server
(`test_grpc_authenticates_before_reading_and_caps_each_method`); this measures its price. Prints one JSON
object: per round trip, the best of three uploads for each.

    .venv/bin/python benchmarks/grpc_window_bench.py [--rtt-ms 2 10 50] [--mib 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.api.grpc_server import GrpcLimits  # noqa: E402

BDP_OFF = ("grpc.http2.bdp_probe", "grpc.http2.lookahead_bytes")


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy one direction, each chunk written `delay` seconds after it was read (reading never waits)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def send() -> None:
        while (item := await queue.get()) is not None:
            due, data = item
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait(None)
        await asyncio.gather(sender, return_exceptions=True)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def _proxy(target: int, delay: float, connections: set[asyncio.Task]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(_forward(reader, up_writer, delay), _forward(up_reader, writer, delay),
                             return_exceptions=True)

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.add(asyncio.ensure_future(handle(reader, writer)))

    return await asyncio.start_server(connected, "127.0.0.1", 0)


async def upload_seconds(options: list[tuple[str, int]], rtt_s: float, size: int) -> float:
    server = grpc.aio.server(options=options)

    async def put(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"ok"

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Upload", {"Put": grpc.unary_unary_rpc_method_handler(put)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    connections: set[asyncio.Task] = set()
    proxy = await _proxy(port, rtt_s / 2, connections)
    address = f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    try:
        async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", size + 1024)]) as ch:
            call = ch.unary_unary("/bench.Upload/Put")
            await call(b"x", timeout=60)  # the connection, before timing
            times = []
            for _ in range(3):
                started = time.perf_counter()
                await call(b"x" * size, timeout=600)
                times.append(time.perf_counter() - started)
        return min(times)
    finally:
        proxy.close()
        await server.stop(0)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)


async def main(rtts_ms: list[float], mib: int) -> dict:
    fixed = GrpcLimits().options()
    options = {"fixed_window": fixed, "bdp_probing": [o for o in fixed if o[0] not in BDP_OFF]}
    size = mib << 20
    out: dict = {"benchmark": "grpc_window", "mib": mib, "stream_window_bytes": GrpcLimits().stream_window_bytes,
                 "runs": []}
    for rtt in rtts_ms:
        row: dict = {"rtt_ms": rtt}
        for name, opts in options.items():
            seconds = await upload_seconds(opts, rtt / 1000, size)
            row[name] = {"seconds": round(seconds, 3), "MB_per_s": round(size / seconds / 1e6, 1)}
        out["runs"].append(row)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[2.0, 10.0, 50.0])
    parser.add_argument("--mib", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.rtt_ms, args.mib))))
