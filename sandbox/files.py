"""`sandbox.files`: moving files into and out of a sandbox's workspace.

Bytes travel through the kernel itself, as raw binary buffers of Jupyter comm messages (a comm
target that inkernel/files.py registers in each kernel): Docker's put_archive cannot see the tmpfs workspace, and the
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

import builtins
import contextlib
import os
import posixpath
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from . import inkernel
from .errors import FileTransferError, UsageError, WorkspacePathError, WorkspaceQuotaError
from .messaging import TRANSFER_CHUNK_BYTES as CHUNK_BYTES

if TYPE_CHECKING:
    from .kernel import Sandbox

COMM_TARGET = "cellforge.files"


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


def regular_files(local_dir: str | Path) -> builtins.list[tuple[str, Path]]:
    """The regular files under a local folder, as (relative posix path, path), sorted per folder."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileTransferError(f"put_dir: {local_dir} is not a folder")
    files = []
    for folder, _, names in os.walk(local_dir):
        for name in sorted(names):
            source = Path(folder) / name
            # Only real files: a symlink could point anywhere on the host.
            if source.is_file() and not source.is_symlink():
                files.append((source.relative_to(local_dir).as_posix(), source))
    return files


def local_destination(top: Path, inner: str, sandbox_id: str) -> Path:
    """Where a file named by the sandbox lands under the resolved local folder `top`; never outside it."""
    destination = (top / inner).resolve()
    if not destination.is_relative_to(top):
        raise WorkspacePathError(f"sandbox {sandbox_id}: listed name {inner!r} escapes {top}")
    return destination


class Files:
    """The workspace of one sandbox: `await sandbox.files.put("code/model.py", data)` and so on.

    Paths are relative to the workspace. Each call holds the kernel for its whole transfer, after
    any running execution, within `timeout` seconds (default: the spec's timeout). Reads stop at
    `max_bytes` (never more than the workspace quota) with FileTransferError.
    """

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox
        self._install = inkernel.call("files", "install", sandbox.workspace, COMM_TARGET)

    async def put(self, path: str, data: bytes, timeout: float | None = None) -> None:
        """Write `data` to `path`, creating folders as needed."""
        rel = workspace_path(path)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UsageError(f"files.put({path!r}): expected bytes, got {type(data).__name__}")
        async with self._exclusive(timeout):
            await self._put(rel, bytes(data))

    async def get(self, path: str, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
        """The bytes of `path`; FileTransferError if missing, not a regular file, or larger than
        `max_bytes`."""
        rel = workspace_path(path)
        async with self._exclusive(timeout):
            return await self._get(rel, self._limit(max_bytes))

    async def list(self, path: str = "", timeout: float | None = None) -> builtins.list[str]:
        """The regular files under the folder `path` (default: the whole workspace), recursively,
        relative to it and sorted; symlinks and special files are left out."""
        rel = workspace_path(path, allow_root=True)
        async with self._exclusive(timeout):
            return await self._list(rel, path)

    async def remove(self, path: str, timeout: float | None = None) -> None:
        """Delete the file `path` (not a folder); FileTransferError if it is missing."""
        rel = workspace_path(path)
        async with self._exclusive(timeout):
            await self._request({"op": "remove", "path": rel})

    async def put_dir(self, local_dir: str | Path, path: str, timeout: float | None = None) -> builtins.list[str]:
        """Copy the regular files under `local_dir` to `path`; returns the workspace paths written."""
        rel = workspace_path(path, allow_root=True)
        files, written = regular_files(local_dir), []
        async with self._exclusive(timeout):
            for inner, source in files:
                target = posixpath.normpath(posixpath.join(rel, inner))
                await self._put(target, source.read_bytes())
                written.append(target)
        return written

    async def get_dir(
        self, path: str, local_dir: str | Path, timeout: float | None = None, max_bytes: int | None = None
    ) -> builtins.list[str]:
        """Copy the regular files under `path` into `local_dir`; returns the local paths written.

        At most `max_bytes` in all (never more than the workspace quota): past it, FileTransferError,
        and the files this call wrote are removed."""
        rel = workspace_path(path, allow_root=True)
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        top = local_dir.resolve()
        budget = total = self._limit(max_bytes)
        written: builtins.list[Path] = []
        try:
            async with self._exclusive(timeout):
                for inner in dict.fromkeys(await self._list(rel, path)):
                    destination = local_destination(top, inner, self._sb.id)
                    try:
                        data = await self._get(posixpath.join(rel, inner), budget)
                    except FileTransferError as exc:
                        raise FileTransferError(f"{exc} (get_dir {path!r}: at most {total} bytes in all)") from None
                    budget -= len(data)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.write_bytes(data)
                    written.append(destination)
        except BaseException:
            for done in written:
                done.unlink(missing_ok=True)
            raise
        return [str(p) for p in written]

    # --- one transfer ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self, timeout: float | None) -> AsyncIterator[None]:
        limit = self._sb.spec.timeout if timeout is None else timeout
        try:
            async with self._sb.exclusive(limit):
                yield
        except TimeoutError:
            raise FileTransferError(
                f"sandbox {self._sb.id}: the transfer did not finish within {limit:g}s (a running execution "
                "holds the kernel, or the data is too large for this timeout)"
            ) from None

    def _limit(self, max_bytes: int | None) -> int:
        quota = self._sb.spec.workspace_bytes
        return quota if max_bytes is None else min(max_bytes, quota)

    async def _request(
        self, data: dict[str, Any], buffers: builtins.list[Any] | None = None
    ) -> tuple[dict[str, Any], builtins.list[bytes]]:
        sb = self._sb
        answer = await sb.comm_request(COMM_TARGET, self._install, data, buffers)
        what = f"sandbox {sb.id}: {data['op']} {data.get('path')!r}"
        if answer.lost:
            raise FileTransferError(f"sandbox {sb.id}: the kernel's connection dropped during a file transfer")
        if answer.oversize is not None:
            raise FileTransferError(f"{what}: the kernel's reply of {answer.oversize} bytes is over the output limit")
        reply = answer.data
        if not isinstance(reply, dict):
            raise FileTransferError(f"{what}: the kernel's reply is malformed")
        if not reply.get("ok"):
            kind, message = reply.get("kind"), str(reply.get("message", "no detail"))[:500]
            path = data.get("path")
            if kind == "quota":
                raise WorkspaceQuotaError(
                    f"sandbox {sb.id}: writing {path} ran past the workspace quota of {sb.spec.workspace_quota} "
                    f"({message})"
                )
            if kind == "path":
                raise WorkspacePathError(f"sandbox {sb.id}: {path!r} is refused: {message}")
            raise FileTransferError(f"{what} failed: {message}")
        return reply, answer.buffers

    async def _put(self, rel: str, data: bytes) -> None:
        view = memoryview(data)
        try:
            for offset in range(0, max(len(view), 1), CHUNK_BYTES):
                chunk = view[offset : offset + CHUNK_BYTES]
                await self._request({"op": "write", "path": rel, "append": offset > 0}, [chunk])
        except WorkspaceQuotaError:
            # Leave no half-written file taking up the quota.
            with contextlib.suppress(FileTransferError):
                await self._request({"op": "remove", "path": rel})
            raise

    async def _get(self, rel: str, limit: int) -> bytes:
        """The file's bytes, at most `limit` of them: FileTransferError as soon as more arrive."""
        sb_id = self._sb.id
        parts: builtins.list[bytes] = []
        received = 0
        while True:
            # One byte more than allowed is enough to tell a file over the limit.
            want = min(CHUNK_BYTES, limit - received + 1)
            reply, buffers = await self._request({"op": "read", "path": rel, "offset": received, "size": want})
            size = reply.get("size")
            if isinstance(size, int) and size > limit:
                raise FileTransferError(f"sandbox {sb_id}: {rel} is {size} bytes, more than the {limit} allowed")
            if len(buffers) > 1 or (buffers and len(buffers[0]) > want):
                raise FileTransferError(f"sandbox {sb_id}: reading {rel}, the kernel sent more than it was asked for")
            chunk = buffers[0] if buffers else b""
            received += len(chunk)
            if received > limit:
                raise FileTransferError(f"sandbox {sb_id}: {rel} holds more than the {limit} allowed")
            parts.append(chunk)
            if len(chunk) < want or (isinstance(size, int) and received >= size):
                return b"".join(parts)

    async def _list(self, rel: str, path: str) -> builtins.list[str]:
        listing, _ = await self._request({"op": "list", "path": rel})
        names = listing.get("files")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise FileTransferError(f"sandbox {self._sb.id}: the kernel's listing of {path!r} is not a list of names")
        # Names come from inside the sandbox: each must be a plain relative path.
        return [workspace_path(name) for name in names]
