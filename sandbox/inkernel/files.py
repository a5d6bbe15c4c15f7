"""Runs in the kernel: the file-transfer endpoint, a comm target serving write, read, list and remove.

Installed once per kernel (`install`), it answers each comm message with `{"ok": True, ...}` and
the file bytes as raw buffers, or `{"ok": False, "kind": ..., "message": ...}` where kind is one of
path, type, missing, quota, io. Every path is resolved (symlinks included) and must stay inside the
workspace; the last component is never followed (O_NOFOLLOW). The host trusts none of the replies:
see sandbox/files.py.
"""

import errno
import os
import stat


class Refused(Exception):
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def install(root, target):
    """Register comm target `target` serving the workspace at `root`."""
    import comm

    root = os.path.realpath(root)

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
