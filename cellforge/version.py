"""The installed CellForge version (what provenance records)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cellforge")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"
