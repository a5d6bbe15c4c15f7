"""Kernel supervisor: the parent of the ipykernel process, in a container (under tini) or on the host.

    python supervisor.py CONNECTION_FILE [--contained] [--user UID:GID]

Standalone on purpose (standard library only): the Docker backend runs it with `python -c` from the
image's interpreter, the local backend as a file. Why a supervisor at all: restarting a kernel must
not restart its container, because the container's tmpfs workspace (uploaded code, outputs) would be
lost with it. So the kernel is a child that can be replaced in place:

- SIGUSR1: kill the kernel's process group (and, with --contained, every other process in the
  container) and start a fresh kernel on the same connection file.
- SIGINT: forwarded to the kernel's process group.
- SIGTERM / SIGHUP: kill the kernel's group and exit 0.
- The kernel exits on its own (crash, OOM kill): kill what it left behind and exit with its status
  (128 + signal), so the container stops and the engine reports the cause (`State.OOMKilled`, exit
  code) — a death is never silently papered over by a restart.

The supervisor, not the kernel, creates the kernel's ipc sockets: it binds and listens on the socket
files the connection file names, once, and hands the listening descriptors to every kernel it starts
(ZMQ's USE_FD option adopts them). So a kernel never creates a file in the socket folder, restarts
included, and the folder can stay read-only to it in every state.

--user UID:GID (the Docker backend starts the supervisor as root holding only SETUID, SETGID, KILL and
SETPCAP): empty the capability bounding set, then run each kernel as UID:GID without supplementary
groups. The kernel has no capability and cannot gain one (no-new-privileges), and under another uid
it cannot signal, trace or stop the supervisor, nor write the folder the supervisor owns.
"""

import ctypes
import errno
import json
import os
import signal
import socket
import subprocess
import sys

KERNEL_ARGS = ("--HistoryManager.enabled=False", "--IPKernelApp.capture_fd_output=True")
CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
# ipykernel_launcher, minus the debugger: importing debugpy costs a few hundred ms of every start,
# and a sandbox has no debugger client (nor should it open debug sockets). A None entry in
# sys.modules makes `import debugpy` fail, which ipykernel treats as "not installed".
# Each bind of a channel address adopts the listening descriptor the supervisor made for it.
KERNEL_BOOT = """\
import sys; sys.modules['debugpy'] = None; sys.path[0] == '' and sys.path.pop(0)
def _adopt(listening):
    import zmq
    bind = zmq.Socket.bind
    def adopt(self, addr):
        fd = listening.pop(addr, None)
        if fd is not None:
            self.setsockopt(zmq.USE_FD, fd)
        return bind(self, addr)
    zmq.Socket.bind = adopt
_adopt(LISTENING); del _adopt
from ipykernel.kernelapp import launch_new_instance; launch_new_instance()
"""
_PR_CAPBSET_DROP = 24


def listen(info: dict) -> dict:
    """Listening unix sockets at the connection file's addresses, readable and writable by us only."""
    if info.get("transport") != "ipc":
        sys.exit(f"supervisor: expected an ipc connection file, got transport {info.get('transport')!r}")
    listening = {}
    umask = os.umask(0o177)
    try:
        for channel in CHANNELS:
            path = f"{info['ip']}-{info[channel]}"
            try:
                os.unlink(path)  # left by an earlier run of this container
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            sock.listen(128)
            listening[f"ipc://{path}"] = sock
    finally:
        os.umask(umask)
    return listening


def empty_bounding_set() -> None:
    """No process started from here on can ever hold a capability (needs CAP_SETPCAP)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    for cap in range(64):
        if prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EINVAL:
                return  # past the last capability this kernel knows
            sys.exit(f"supervisor: cannot drop capability {cap}: {os.strerror(ctypes.get_errno())}")


def main() -> None:
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: supervisor.py CONNECTION_FILE [--contained] [--user UID:GID]")
    connection_file, contained = args[0], "--contained" in args[1:]
    user = None
    if "--user" in args[1:]:
        uid, gid = args[args.index("--user") + 1].split(":")
        user = {"user": int(uid), "group": int(gid), "extra_groups": []}
        empty_bounding_set()
    with open(connection_file) as f:
        listening = listen(json.load(f))
    fds = {addr: sock.fileno() for addr, sock in listening.items()}
    argv = [sys.executable, "-c", KERNEL_BOOT.replace("LISTENING", repr(fds)), "-f", connection_file, *KERNEL_ARGS]
    requested = {"restart": False, "stop": False}

    def start() -> subprocess.Popen:
        # Own session: the kernel's interrupt (killpg SIGINT) reaches it and its children, not us.
        return subprocess.Popen(
            argv, start_new_session=True, stdin=subprocess.DEVNULL, pass_fds=tuple(fds.values()), **(user or {})
        )

    kernel = start()

    def kill_leftovers() -> None:
        try:
            os.killpg(kernel.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if contained:
            # In a container everything but init and us belongs to the sandboxed code, including
            # processes that escaped the kernel's group with setsid(). Never on the host.
            try:
                os.kill(-1, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def on_restart(signum, frame):
        requested["restart"] = True
        kill_leftovers()

    def on_stop(signum, frame):
        requested["stop"] = True
        kill_leftovers()

    def on_interrupt(signum, frame):
        try:
            os.killpg(kernel.pid, signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            pass

    signal.signal(signal.SIGUSR1, on_restart)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGHUP, on_stop)
    signal.signal(signal.SIGINT, on_interrupt)

    while True:
        status = kernel.wait()
        if requested["stop"]:
            sys.exit(0)
        if requested["restart"]:
            requested["restart"] = False
            kernel = start()
            continue
        kill_leftovers()
        sys.exit(128 - status if status < 0 else status)


if __name__ == "__main__":
    main()
