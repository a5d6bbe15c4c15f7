"""The relay's ZMTP framing check, on byte streams (the relay itself is in every sandbox test)."""

from __future__ import annotations

import pytest

from sandbox.relay import MAX_FRAMES, ZmtpLimiter

GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 1]) + b"NULL".ljust(20, b"\0") + b"\0" * 32
_READY_BODY = b"\x05READY\x0bSocket-Type" + (3).to_bytes(4, "big") + b"PUB"
READY = bytes([0x04, len(_READY_BODY)]) + _READY_BODY


def frame(payload: bytes, more: bool = False) -> bytes:
    flags = 0x01 if more else 0
    if len(payload) > 255:
        return bytes([flags | 0x02]) + len(payload).to_bytes(8, "big") + payload
    return bytes([flags, len(payload)]) + payload


def feed(stream: bytes, limit: int, step: int | None = None) -> bool:
    limiter = ZmtpLimiter(limit)
    chunks = [stream] if step is None else [stream[i : i + step] for i in range(0, len(stream), step)]
    return all(limiter.feed(chunk) for chunk in chunks)


@pytest.mark.parametrize("step", [None, 1, 7])
def test_messages_under_the_limit_pass_whatever_the_chunking(step):
    message = frame(b"<IDS|MSG>", True) + frame(b"sig" * 20, True) + frame(b"x" * 600)
    assert feed(GREETING + READY + message * 5, limit=1000, step=step)


@pytest.mark.parametrize("step", [None, 1, 4096])
def test_a_message_over_the_limit_is_cut_even_in_frames_under_it(step):
    endless = frame(b"x" * 400, more=True) * 3  # 1200 bytes, never finished
    assert not feed(GREETING + READY + endless, limit=1000, step=step)
    assert feed(GREETING + READY + frame(b"x" * 400, True) + frame(b"x" * 400) + frame(b"x" * 400), limit=1000)


@pytest.mark.parametrize("step", [None, 3])
def test_floods_of_tiny_frames_or_commands_are_cut_early(step):
    assert feed(GREETING + READY + frame(b"x", more=True) * (MAX_FRAMES - 1) + frame(b"x"), limit=1000, step=step)
    assert not feed(GREETING + READY + frame(b"x", more=True) * (MAX_FRAMES + 1), limit=1000, step=step)
    ping = bytes([0x04, 5]) + b"\x04PING"
    assert not feed(GREETING + READY + ping * 20, limit=1000, step=step)


def test_anything_but_zmtp3_is_cut():
    assert not feed(b"GET / HTTP/1.1\r\n" + b"\0" * 64, limit=1000)
    assert not feed(GREETING[:10] + bytes([1]) + GREETING[11:], limit=1000)  # ZMTP 2 asked for
    assert not feed(GREETING + bytes([0x08, 1, 0]), limit=1000)  # reserved flag bit
    assert not feed(GREETING + bytes([0x06]) + (1 << 20).to_bytes(8, "big"), limit=10 << 20)  # huge command
