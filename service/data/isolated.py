"""Checking a dataset in a child process of its own, killed at a deadline and under an address-space
cap: a file that hangs, swells or crashes the readers costs one child, never the caller.

Children are forks of a forkserver that has the data layer imported (milliseconds each, instead of
seconds for a fresh interpreter); the forkserver starts on `start_forkserver()` or the first check.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.forkserver
import resource
import sys
import types
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

from .h5safety import H5Limits

_FORK = multiprocessing.get_context("forkserver")

Outcome = Literal["ok", "invalid", "too_large", "memory", "timeout", "crashed"]


@dataclass(frozen=True)
class CheckResult:
    """`layout` (the DatasetLayout as JSON) when ok; else `message` (invalid, too_large), or the
    child's `exit_code` (crashed)."""

    outcome: Outcome
    layout: dict[str, Any] | None = None
    message: str = ""
    exit_code: int | None = None


def start_forkserver() -> None:
    """Start the forkserver now (its imports run in the background), so the first check is quick."""
    _FORK.set_forkserver_preload(_preload())
    multiprocessing.forkserver.ensure_running()


def _preload() -> list[str]:
    """The data layer, and what the caller's main script names (the `cellforge` script: service.cli).
    Each child re-runs a main script given by path to rebuild `__main__` (Python 3.11's forkserver
    cannot preload it: it looks for a `main_path` key that is never set); with its imports already in
    the forkserver, that takes milliseconds instead of a fresh import of the CLI."""
    names = {"service.data"}
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__spec__", None) is None:
        for value in vars(main).values():
            name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
            if isinstance(name, str) and not name.startswith("_"):
                names.add(name)
    return sorted(names)


def check_isolated(path: Path, *, limits: H5Limits, timeout_s: float, memory_bytes: int) -> CheckResult:
    """Load and validate `path` (backed, through `read_h5ad` and `limits`) in a child process that may
    add at most `memory_bytes` of address space and is killed after `timeout_s`. Blocks the calling
    thread until then."""
    _FORK.set_forkserver_preload(_preload())
    receiver, sender = _FORK.Pipe(duplex=False)
    child = _FORK.Process(target=_check_in_child, args=(sender, path, limits, memory_bytes), daemon=True,
                          name="cellforge-dataset-check")
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            return CheckResult("timeout")
        try:
            return receiver.recv()
        except EOFError:  # died without answering: killed (e.g. for memory), or crashed in native code
            child.join(5)
            return CheckResult("crashed", exit_code=child.exitcode)
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        child.close()
        receiver.close()


def _check_in_child(sender: Connection, path: Path, limits: H5Limits, memory_bytes: int) -> None:
    from . import DataError, DataTooLarge, load_dataset

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not dump the file's data to disk
    cap = _address_space() + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        layout = load_dataset(path, backed=True, limits=limits).layout
        result = CheckResult("ok", layout=layout.model_dump(mode="json", exclude={"source"}))
    except DataTooLarge as exc:
        result = CheckResult("too_large", message=str(exc))
    except DataError as exc:
        result = CheckResult("invalid", message=str(exc))
    except MemoryError:
        result = CheckResult("memory")
    except OSError as exc:
        # HDF5 reports an allocation that failed inside a decompression filter as a filter failure, not as
        # MemoryError: a chunk too big for the cap is the memory outcome; any other read error is the file's.
        chunk = _largest_chunk_bytes(path) if "filter returned failure" in str(exc) else 0
        result = (CheckResult("memory", message=f"{path}: a chunk decompresses to {chunk:,} bytes, too much for "
                              f"the check's {memory_bytes:,}-byte memory cap")
                  if 2 * chunk >= memory_bytes else
                  CheckResult("invalid", message=f"{path}: cannot be read as AnnData ({type(exc).__name__})"))
    except Exception as exc:  # anything else the readers raise on a malformed file: its type, not its text
        result = CheckResult("invalid", message=f"{path}: cannot be read as AnnData ({type(exc).__name__})")
    sender.send(result)
    sender.close()


def _largest_chunk_bytes(path: Path) -> int:
    """Decompressed bytes of the file's largest chunk (its metadata only; the file passed the checks)."""
    import h5py

    sizes = [0]

    def visit(_: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and obj.chunks:
            sizes.append(math.prod(obj.chunks) * obj.dtype.itemsize)

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except (OSError, ValueError):
        return 0
    return max(sizes)


def _address_space() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * resource.getpagesize()
