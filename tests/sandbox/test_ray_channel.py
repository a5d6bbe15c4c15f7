"""The Ray sandbox's execution channel on real loopback TCP: a node's end (ChannelServer) running a scripted
run, and the caller's end (ChannelClient). The whole path through a Ray actor is in test_ray_backend.py."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from dataclasses import replace

import pytest

from sandbox.errors import UsageError
from sandbox.ray_channel import (
    MAX_REQUEST,
    TOKEN_BYTES,
    ChannelAddress,
    ChannelClient,
    ChannelServer,
    ChannelUnreachable,
    configured_ports,
)


class Node:
    """A node's end whose runs yield one batch per line of the code, then {"end": code}; "fail" raises a
    sandbox error, "wait" runs until cancelled (and says so)."""

    def __init__(self) -> None:
        self.requests: list[tuple] = []
        self.cancelled = asyncio.Event()
        self.server = ChannelServer(self.items)

    async def items(self, code, timeout, expressions, watched):
        self.requests.append((code, timeout, expressions, watched))
        if code == "fail":
            raise UsageError("no such thing")
        if code == "wait":
            try:
                yield ["started"]
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        for line in code.splitlines():
            yield [line]
        yield {"end": code}


@pytest.fixture
async def node():
    n = Node()
    n.address = await n.server.open("127.0.0.1")
    yield n
    await n.server.close()


async def test_a_run_streams_its_batches_and_ends_with_its_result(node):
    client = ChannelClient(node.address)
    batches = []
    conn = await client.connection()
    end = await client.run(conn, client.request("a\nb", 5.0, {"x": "1"}, True), batches.append)
    assert batches == [["a"], ["b"]] and end == {"end": "a\nb"}
    assert node.requests == [("a\nb", 5.0, {"x": "1"}, True)]
    # Unwatched, and over the same connection (kept for reuse after a whole exchange).
    again = await client.connection()
    assert again is conn
    assert await client.run(again, client.request("c", None, None, False), None) == {"end": "c"}
    assert node.requests[-1] == ("c", None, None, False)
    client.close()


async def test_a_sandbox_error_crosses_as_itself_and_the_connection_stays_usable(node):
    client = ChannelClient(node.address)
    conn = await client.connection()
    with pytest.raises(UsageError, match="no such thing"):
        await client.run(conn, client.request("fail", None, None, False), None)
    conn = await client.connection()
    assert await client.run(conn, client.request("ok", None, None, False), None) == {"end": "ok"}
    client.close()


async def test_a_caller_that_leaves_cancels_its_run_on_the_node(node):
    client = ChannelClient(node.address)
    started = asyncio.Event()
    conn = await client.connection()
    run = asyncio.ensure_future(client.run(conn, client.request("wait", None, None, True), lambda batch: started.set()))
    await asyncio.wait_for(started.wait(), 5)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await asyncio.wait_for(node.cancelled.wait(), 5)
    # That connection is gone; a new one serves the next run.
    conn = await client.connection()
    assert await client.run(conn, client.request("next", None, None, False), None) == {"end": "next"}
    client.close()


async def _raw(address: ChannelAddress, token: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(token)
    return reader, writer


async def test_a_peer_without_the_token_learns_nothing_and_runs_nothing(node):
    reader, writer = await _raw(node.address, b"x" * TOKEN_BYTES)
    writer.write(struct.pack("!Q", 9) + b'{"code":1}')
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, and the node's token never sent
    writer.close()
    assert node.requests == []


@pytest.mark.parametrize("frame", [
    struct.pack("!Q", 5) + b"[1,2]",  # not a request
    struct.pack("!Q", 40) + json.dumps({"code": 1, "timeout": None, "expressions": None, "watched": 1}).encode()[:40],
    struct.pack("!Q", 1 << 40),  # a length no request has
])
async def test_a_malformed_request_closes_the_connection_and_the_node_serves_others(node, frame):
    reader, writer = await _raw(node.address, node.address.client_token)
    assert await reader.readexactly(TOKEN_BYTES) == node.address.server_token
    writer.write(frame)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert node.requests == []
    client = ChannelClient(node.address)
    assert await client.run(await client.connection(), client.request("fine", None, None, False), None) == {"end": "fine"}
    client.close()


async def test_a_port_that_does_not_answer_as_the_node_is_unreachable(node):
    # Someone else on the port (after the actor ended) does not know the node's token.
    impostor = await asyncio.start_server(lambda r, w: w.write(b"y" * TOKEN_BYTES), "127.0.0.1", 0)
    port = impostor.sockets[0].getsockname()[1]
    with pytest.raises(ChannelUnreachable, match="did not answer as the sandbox's node"):
        await ChannelClient(replace(node.address, port=port)).connection()
    impostor.close()
    with pytest.raises(ChannelUnreachable):  # nobody listens there any more
        await ChannelClient(replace(node.address, port=port)).connection()


def test_a_request_larger_than_a_node_takes_is_left_to_ray_calls():
    assert ChannelClient.request("x" * 100, None, None, False) is not None
    assert ChannelClient.request("x" * MAX_REQUEST, None, None, False) is None


async def test_closing_the_node_end_ends_its_connections(node):
    client = ChannelClient(node.address)
    conn = await client.connection()
    run = asyncio.ensure_future(client.run(conn, client.request("wait", None, None, True), lambda batch: None))
    await asyncio.sleep(0.2)
    await node.server.close()
    with pytest.raises((ConnectionError, EOFError)):
        await asyncio.wait_for(run, 5)
    await asyncio.wait_for(node.cancelled.wait(), 5)


def _listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def _three_free_ports() -> tuple[int, list[socket.socket]]:
    """A first port of three consecutive free ones, held (listening) until the caller closes them."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + 2 > 65535:
            continue
        try:
            return first, [_listening(first + k) for k in range(3)]
        except OSError:
            continue
    pytest.skip("no three consecutive free ports on loopback")


async def test_a_configured_port_range_is_where_the_node_listens():
    first, held = _three_free_ports()
    held[1].close()  # the one free port of the range
    node = ChannelServer(Node().items)
    address = await node.open("127.0.0.1", range(first, first + 3))
    assert address.port == first + 1
    with pytest.raises(OSError, match=f"every port of {first}-{first + 2} is taken"):  # the node holds the last one
        await ChannelServer(Node().items).open("127.0.0.1", range(first, first + 3))
    await node.close()
    for sock in held:
        sock.close()


@pytest.mark.parametrize(("value", "expected"), [
    ("", None), ("  ", None), ("40000-40999", range(40000, 41000)), ("40100", range(40100, 40101)),
    ("off", "off"), (" OFF ", "off"),
])
def test_the_port_range_setting(value, expected):
    assert configured_ports(value) == expected


@pytest.mark.parametrize("value", ["40000-", "a-b", "0-10", "50000-40000", "40000-70000", "40000:40010"])
def test_a_bad_port_range_setting_names_the_variable(value):
    with pytest.raises(UsageError, match="CELLFORGE_RAY_CHANNEL_PORTS"):
        configured_ports(value)
