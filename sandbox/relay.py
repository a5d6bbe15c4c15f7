"""A byte relay between the host's ZMQ sockets and a kernel's, that cuts any message over a size.

libzmq caps each frame it receives (MAXMSGSIZE) but not a message: a kernel writing raw ZMTP on its
connection can send one message of endless frames, and the host's libzmq would buffer all of it. So
the host's sockets connect to this relay (unix sockets in a 0700 folder beside the kernel's, named
by `relay_folder`), which connects to the kernel's. From the kernel's side it follows the ZMTP 3 framing — the greeting, then a
flags byte and a size per frame — counting payload bytes without reading them, and closes the
connection as soon as a message grows past its size or frame count, or the kernel sends more than a
few commands (an honest one sends READY and nothing else), before those bytes reach libzmq; so the
relay never spends more than a few dozen frame headers of work on a hostile message either. What
the host sends is copied as is. The relay holds a host connection open while the kernel's end
does not answer yet (a kernel starting or restarting), as a listening socket's backlog would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import UsageError

CHANNELS = ("shell", "iopub", "control")
_CHUNK = 1 << 16
_RETRY_S = 0.01
_GREETING_BYTES = 64
_COMMAND_LIMIT = 64 << 10
_MAX_COMMANDS = 16
# An honest Jupyter message: topic or delimiter, signature, four parts, a few buffers.
MAX_FRAMES = 64
_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04


class ZmtpLimiter:
    """Follows the ZMTP 3 framing of one direction of a connection; `feed` is False once the
    stream is not ZMTP 3, a message (all its frames) is over `message_limit` bytes or MAX_FRAMES
    frames, or the commands are too many or too large."""

    def __init__(self, message_limit: int) -> None:
        self.message_limit = message_limit
        self._greeting = bytearray()
        self._header = bytearray()
        self._skip = 0  # payload bytes of the current frame still to come
        self._message = 0  # bytes of the current message so far
        self._frames = 0  # frames of the current message so far
        self._commands = 0

    def feed(self, data: bytes) -> bool:
        at, end = 0, len(data)
        while at < end:
            if len(self._greeting) < _GREETING_BYTES:
                take = min(_GREETING_BYTES - len(self._greeting), end - at)
                self._greeting += data[at : at + take]
                at += take
                greeting = self._greeting
                if greeting[0] != 0xFF or (len(greeting) > 10 and (greeting[9] != 0x7F or greeting[10] < 3)):
                    return False  # not a ZMTP 3 peer
                continue
            if self._skip:
                step = min(self._skip, end - at)
                self._skip -= step
                at += step
                continue
            self._header.append(data[at])
            at += 1
            flags = self._header[0]
            if flags & ~(_MORE | _LONG | _COMMAND):
                return False
            need = 9 if flags & _LONG else 2
            if len(self._header) < need:
                continue
            size = int.from_bytes(self._header[1:need], "big")
            self._header.clear()
            if flags & _COMMAND:
                self._commands += 1
                if size > _COMMAND_LIMIT or self._commands > _MAX_COMMANDS:
                    return False
            else:
                self._message += size
                self._frames += 1
                if self._message > self.message_limit or self._frames > MAX_FRAMES:
                    return False
                if not flags & _MORE:
                    self._message = self._frames = 0
            self._skip = size
        return True


def relay_folder(kernel_folder: str) -> Path:
    """Where the relay of the kernel whose sockets are in `kernel_folder` keeps its own."""
    return Path(f"{kernel_folder.rstrip('/')}-relay")


class KernelRelay:
    """The relay of one kernel connection: `info` is what the host's client connects to."""

    def __init__(self, kernel_info: dict[str, Any], message_limit: int) -> None:
        if kernel_info.get("transport") != "ipc":
            raise UsageError(f"KernelRelay: expected an ipc connection, got {kernel_info.get('transport')!r}")
        self._kernel = kernel_info
        self.message_limit = message_limit
        self._folder = relay_folder(os.path.dirname(kernel_info["ip"]))
        self.info = {**kernel_info, "ip": str(self._folder / "k")}
        self._servers: list[asyncio.AbstractServer] = []
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._folder.mkdir(mode=0o700)
        for channel in CHANNELS:
            port = self._kernel[f"{channel}_port"]
            kernel_path = f"{self._kernel['ip']}-{port}"
            server = await asyncio.start_unix_server(
                lambda r, w, path=kernel_path: self._track(self._pump(path, r, w)),
                path=f"{self.info['ip']}-{port}",
                limit=_CHUNK,
            )
            self._servers.append(server)

    def _track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, kernel_path: str, host_reader: asyncio.StreamReader, host_writer: asyncio.StreamWriter
    ) -> None:
        kernel_writer = None
        from_host = asyncio.ensure_future(host_reader.read(_CHUNK))
        try:
            waiting = bytearray()
            while True:
                try:
                    kernel_reader, kernel_writer = await asyncio.open_unix_connection(kernel_path, limit=_CHUNK)
                    break
                except OSError:
                    # Not listening yet (a kernel starting, a container restarting): keep the
                    # host's connection, as a listening socket's backlog would.
                    await asyncio.wait({from_host}, timeout=_RETRY_S)
                    if from_host.done():
                        chunk = from_host.result()
                        if not chunk:
                            return
                        waiting += chunk
                        from_host = asyncio.ensure_future(host_reader.read(_CHUNK))
            kernel_writer.write(bytes(waiting))
            copies = [
                asyncio.ensure_future(self._copy_up(from_host, host_reader, kernel_writer)),
                asyncio.ensure_future(self._copy_down(kernel_reader, host_writer)),
            ]
            try:
                # Either end closing (or the limit cut) closes both.
                await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for copy in copies:
                    copy.cancel()
                await asyncio.gather(*copies, return_exceptions=True)
        finally:
            from_host.cancel()
            for writer in (host_writer, kernel_writer):
                if writer is not None:
                    writer.close()

    @staticmethod
    async def _copy_up(first: asyncio.Future, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            chunk = await first
            while chunk:
                writer.write(chunk)
                await writer.drain()
                chunk = await reader.read(_CHUNK)
        finally:
            writer.close()

    async def _copy_down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limiter = ZmtpLimiter(self.message_limit)
        try:
            while chunk := await reader.read(_CHUNK):
                if not limiter.feed(chunk):
                    return
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._pumps):
            task.cancel()
        for task in list(self._pumps):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._servers = []
        shutil.rmtree(self._folder, ignore_errors=True)
