"""Kernel supervisor: the parent of the ipykernel process, in a container (under tini) or on the host.

    python supervisor.py CONNECTION_FILE [--contained]

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
"""

import os
import signal
import subprocess
import sys

KERNEL_ARGS = ("--HistoryManager.enabled=False", "--IPKernelApp.capture_fd_output=True")
# ipykernel_launcher, minus the debugger: importing debugpy costs a few hundred ms of every start,
# and a sandbox has no debugger client (nor should it open debug sockets). A None entry in
# sys.modules makes `import debugpy` fail, which ipykernel treats as "not installed".
KERNEL_BOOT = (
    "import sys; sys.modules['debugpy'] = None; sys.path[0] == '' and sys.path.pop(0); "
    "from ipykernel.kernelapp import launch_new_instance; launch_new_instance()"
)


def main() -> None:
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: supervisor.py CONNECTION_FILE [--contained]")
    connection_file, contained = args[0], "--contained" in args[1:]
    argv = [sys.executable, "-c", KERNEL_BOOT, "-f", connection_file, *KERNEL_ARGS]
    requested = {"restart": False, "stop": False}

    def start() -> subprocess.Popen:
        # Own session: the kernel's interrupt (killpg SIGINT) reaches it and its children, not us.
        return subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)

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
