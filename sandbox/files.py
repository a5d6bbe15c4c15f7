"""Moving files into and out of a sandbox's workspace.

Bytes travel through the kernel itself, as raw binary buffers of Jupyter comm messages (a comm
target registered in each kernel): Docker's put_archive cannot see the tmpfs workspace, and the
bind-mounted socket folder is kept read-only to the sandbox (see docker_backend). Going through the
kernel also means the writes happen *inside* the sandbox, so the workspace quota (the tmpfs size)
is what stops them, and the same code serves the local backend. No base64, no JSON on the payload:
chunks are ZMQ frames.

Paths are checked twice: here (relative, no `..`, no NUL) and in the kernel (the resolved real path,
symlinks included, must stay inside the workspace; the last component is never followed). Replies
come from inside the sandbox and are not trusted: names listed by the kernel are checked again
before anything is written on the host, and bytes are counted here as they arrive — a size the
kernel reports only ever makes a transfer stop sooner. Nothing read out of a sandbox is larger than
its workspace quota (a `get_dir` in total), since no honest file in the workspace can be.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import uuid
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .errors import FileTransferError, SandboxStartError, WorkspacePathError, WorkspaceQuotaError
from .kernel import TRANSFER_CHUNK_BYTES as CHUNK_BYTES
from .kernel import Listener, ReplyWaiter

if TYPE_CHECKING:
    from .kernel import Sandbox

COMM_TARGET = "cellforge.files"

# Runs once in each new kernel. Kept out of the user's namespace (a function, then deleted).
_KERNEL_SIDE = """
def __cellforge_files(root, target):
    import comm, errno, os, stat
    root = os.path.realpath(root)

    class Refused(Exception):
        def __init__(self, kind, message):
            super().__init__(message)
            self.kind = kind

    def resolve(rel):
        full = os.path.realpath(os.path.join(root, rel))
        if full != root and not full.startswith(root + os.sep):
            raise Refused("path", f"{rel} resolves outside the workspace")
        return full

    def write(data, buffers):
        full = resolve(data["path"])
        os.makedirs(os.path.dirname(full), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if data.get("append") else os.O_TRUNC)
        fd = os.open(full, flags, 0o644)
        try:
            for buf in buffers:
                view = memoryview(buf)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return {}, []

    def read(data, buffers):
        fd = os.open(resolve(data["path"]), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise Refused("type", f"{data['path']} is not a regular file")
            os.lseek(fd, data["offset"], os.SEEK_SET)
            parts, left = [], data["size"]
            while left > 0:
                chunk = os.read(fd, left)
                if not chunk:
                    break
                parts.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        return {"size": size}, [b"".join(parts)]

    def listing(data, buffers):
        top = resolve(data["path"])
        if not os.path.isdir(top):
            raise Refused("type" if os.path.exists(top) else "missing", f"{data['path']} is not a folder")
        files, skipped = [], []
        for folder, dirs, names in os.walk(top):
            for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
                full = os.path.join(folder, name)
                rel = os.path.relpath(full, top)
                (files if os.path.isfile(full) and not os.path.islink(full) else skipped).append(rel)
        return {"files": sorted(files), "skipped": sorted(skipped)}, []

    def remove(data, buffers):
        os.unlink(resolve(data["path"]))
        return {}, []

    ops = {"write": write, "read": read, "list": listing, "remove": remove}

    def on_msg(channel, msg):
        data, buffers = msg["content"]["data"], msg.get("buffers") or []
        try:
            reply, out = ops[data["op"]](data, buffers)
            reply["ok"] = True
        except Refused as exc:
            reply, out = {"ok": False, "kind": exc.kind, "message": str(exc)}, []
        except OSError as exc:
            kind = {errno.ENOSPC: "quota", errno.EDQUOT: "quota", errno.ENOENT: "missing",
                    errno.ELOOP: "path", errno.EISDIR: "type", errno.ENOTDIR: "type"}.get(exc.errno, "io")
            reply, out = {"ok": False, "kind": kind, "message": f"{type(exc).__name__}: {exc.strerror}"}, []
        channel.send(reply, buffers=out)

    def on_open(channel, open_msg):
        channel.on_msg(lambda msg: on_msg(channel, msg))

    comm.get_comm_manager().register_target(target, on_open)

__cellforge_files(ROOT, TARGET)
del __cellforge_files
"""


def workspace_path(path: str, *, allow_root: bool = False) -> str:
    """A normalized path relative to the workspace; WorkspacePathError for anything that could escape."""
    if not isinstance(path, str) or "\x00" in path:
        raise WorkspacePathError(f"workspace path must be a string without NUL, got {path!r}")
    if path.startswith("/") or path.startswith("~"):
        raise WorkspacePathError(f"workspace path {path!r} must be relative to the workspace, not absolute")
    if ".." in PurePosixPath(path).parts:
        raise WorkspacePathError(f"workspace path {path!r} must not contain '..'")
    normalized = posixpath.normpath(path) if path else "."
    if normalized == "." and not allow_root:
        raise WorkspacePathError(f"workspace path {path!r} names the workspace itself, not a file")
    return normalized


class _CommReply(Listener):
    def __init__(self) -> None:
        self.msg: dict[str, Any] | None = None
        self.lost = False
        self.done = asyncio.Event()

    def on_iopub(self, msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "comm_msg":
            self.msg = msg
            self.done.set()

    def on_lost(self) -> None:
        self.lost = True
        self.done.set()

    def on_iopub_gap(self) -> None:
        # The reply travels on iopub: it may be lost with the connection.
        self.on_lost()


async def _channel(sb: Sandbox) -> str:
    """The comm id of the file channel of the current kernel, set up on first use."""
    if sb.files_channel is not None:
        return sb.files_channel
    client = sb.client
    setup = ReplyWaiter()
    code = _KERNEL_SIDE.replace("ROOT, TARGET", f"{sb.workspace!r}, {COMM_TARGET!r}")
    msg_id = client.execute(code, setup, silent=True, store_history=False)
    try:
        await setup.done.wait()
    finally:
        client.forget(msg_id)
    reply = setup.reply["content"] if setup.reply else {}
    if reply.get("status") != "ok":
        detail = reply.get("evalue", "kernel connection lost")
        raise SandboxStartError(f"sandbox {sb.id}: could not set up file transfer in the kernel: {detail}")
    comm_id = uuid.uuid4().hex
    client.send_shell("comm_open", {"comm_id": comm_id, "target_name": COMM_TARGET, "data": {}})
    sb.files_channel = comm_id
    return comm_id


async def _request(sb: Sandbox, data: dict[str, Any], buffers: list[bytes] | None = None) -> tuple[dict, list]:
    comm_id = await _channel(sb)
    await sb.client.iopub_ready()
    waiter = _CommReply()
    msg_id = sb.client.send_shell("comm_msg", {"comm_id": comm_id, "data": data}, waiter, buffers)
    try:
        await waiter.done.wait()
    finally:
        sb.client.forget(msg_id)
    if waiter.msg is None:
        raise FileTransferError(f"sandbox {sb.id}: the kernel's connection dropped during a file transfer")
    if "oversize" in waiter.msg:
        raise FileTransferError(
            f"sandbox {sb.id}: {data['op']} {data.get('path')!r}: the kernel's reply of {waiter.msg['oversize']} "
            "bytes is over the output limit"
        )
    reply = waiter.msg["content"].get("data")
    if not isinstance(reply, dict):
        raise FileTransferError(f"sandbox {sb.id}: {data['op']} {data.get('path')!r}: the kernel's reply is malformed")
    if not reply.get("ok"):
        kind, message = reply.get("kind"), str(reply.get("message", "no detail"))[:500]
        path = data.get("path")
        if kind == "quota":
            raise WorkspaceQuotaError(
                f"sandbox {sb.id}: writing {path} ran past the workspace quota of {sb.spec.workspace_quota} ({message})"
            )
        if kind == "path":
            raise WorkspacePathError(f"sandbox {sb.id}: {path!r} is refused: {message}")
        raise FileTransferError(f"sandbox {sb.id}: {data['op']} {path!r} failed: {message}")
    return reply, [bytes(b) for b in waiter.msg.get("buffers") or []]


@contextlib.asynccontextmanager
async def _exclusive(sb: Sandbox, timeout: float | None):
    """Hold the sandbox (after any running execution) for one transfer, within `timeout`."""
    sb.check_usable()
    limit = sb.spec.timeout if timeout is None else timeout
    try:
        async with asyncio.timeout(limit):
            async with sb.lock:
                sb.check_usable()
                yield
    except TimeoutError:
        raise FileTransferError(
            f"sandbox {sb.id}: the transfer did not finish within {limit:g}s (a running execution holds "
            "the kernel, or the data is too large for this timeout)"
        ) from None


async def _put(sb: Sandbox, rel: str, data: bytes) -> None:
    view = memoryview(data)
    offsets = range(0, max(len(view), 1), CHUNK_BYTES)
    try:
        for offset in offsets:
            chunk = view[offset : offset + CHUNK_BYTES]
            await _request(sb, {"op": "write", "path": rel, "append": offset > 0}, [chunk])
    except WorkspaceQuotaError:
        # Leave no half-written file taking up the quota.
        with contextlib.suppress(FileTransferError):
            await _request(sb, {"op": "remove", "path": rel})
        raise


def _limit(sb: Sandbox, max_bytes: int | None) -> int:
    quota = sb.spec.workspace_bytes
    return quota if max_bytes is None else min(max_bytes, quota)


async def _get(sb: Sandbox, rel: str, limit: int) -> bytes:
    """The file's bytes, at most `limit` of them: FileTransferError as soon as more arrive."""
    parts: list[bytes] = []
    received = 0
    while True:
        # One byte more than allowed is enough to tell a file over the limit.
        want = min(CHUNK_BYTES, limit - received + 1)
        reply, buffers = await _request(sb, {"op": "read", "path": rel, "offset": received, "size": want})
        size = reply.get("size")
        if isinstance(size, int) and size > limit:
            raise FileTransferError(f"sandbox {sb.id}: {rel} is {size} bytes, more than the {limit} allowed")
        if len(buffers) > 1 or (buffers and len(buffers[0]) > want):
            raise FileTransferError(f"sandbox {sb.id}: reading {rel}, the kernel sent more than it was asked for")
        chunk = buffers[0] if buffers else b""
        received += len(chunk)
        if received > limit:
            raise FileTransferError(f"sandbox {sb.id}: {rel} holds more than the {limit} allowed")
        parts.append(chunk)
        if len(chunk) < want or (isinstance(size, int) and received >= size):
            return b"".join(parts)


async def put_file(sb: Sandbox, path: str, data: bytes, timeout: float | None = None) -> None:
    """Write `data` to `path` (relative to the workspace), creating folders as needed."""
    rel = workspace_path(path)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"put_file({path!r}): expected bytes, got {type(data).__name__}")
    async with _exclusive(sb, timeout):
        await _put(sb, rel, bytes(data))


async def get_file(sb: Sandbox, path: str, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of `path` (relative to the workspace); FileTransferError if missing, not a file, or
    larger than `max_bytes` (and never more than the workspace quota)."""
    rel = workspace_path(path)
    async with _exclusive(sb, timeout):
        return await _get(sb, rel, _limit(sb, max_bytes))


async def put_dir(sb: Sandbox, local_dir: Path, path: str, timeout: float | None = None) -> list[str]:
    """Copy the regular files under `local_dir` to `path`; returns the workspace paths written."""
    rel = workspace_path(path, allow_root=True)
    if not local_dir.is_dir():
        raise FileTransferError(f"put_dir: {local_dir} is not a folder")
    files = []
    for folder, _, names in os.walk(local_dir):
        for name in sorted(names):
            source = Path(folder) / name
            # Only real files: a symlink could point anywhere on the host.
            if source.is_file() and not source.is_symlink():
                files.append(source)
    written = []
    async with _exclusive(sb, timeout):
        for source in files:
            target = posixpath.normpath(posixpath.join(rel, source.relative_to(local_dir).as_posix()))
            await _put(sb, target, source.read_bytes())
            written.append(target)
    return written


async def get_dir(
    sb: Sandbox, path: str, local_dir: Path, timeout: float | None = None, max_bytes: int | None = None
) -> list[str]:
    """Copy the regular files under `path` into `local_dir`; returns the local paths written.

    At most `max_bytes` in all (never more than the workspace quota): past it, FileTransferError,
    and the files this call wrote are removed."""
    rel = workspace_path(path, allow_root=True)
    local_dir.mkdir(parents=True, exist_ok=True)
    top = local_dir.resolve()
    budget = _limit(sb, max_bytes)
    written: list[Path] = []
    try:
        async with _exclusive(sb, timeout):
            listing, _ = await _request(sb, {"op": "list", "path": rel})
            names = listing.get("files")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise FileTransferError(f"sandbox {sb.id}: the kernel's listing of {path!r} is not a list of names")
            for inner in dict.fromkeys(workspace_path(name) for name in names):
                destination = (top / inner).resolve()
                if not destination.is_relative_to(top):
                    raise WorkspacePathError(f"sandbox {sb.id}: listed name {inner!r} escapes {local_dir}")
                try:
                    data = await _get(sb, posixpath.join(rel, inner), budget)
                except FileTransferError as exc:
                    raise FileTransferError(
                        f"{exc} (get_dir {path!r}: at most {_limit(sb, max_bytes)} bytes in all)"
                    ) from None
                budget -= len(data)
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(data)
                written.append(destination)
    except BaseException:
        for done in written:
            done.unlink(missing_ok=True)
        raise
    return [str(p) for p in written]
