"""The root of every error the service layer raises on purpose (`sandbox` keeps `SandboxError` as its own).

Each area subclasses it (data, LLM, agents, pipeline, jobs, API, client), keeping a builtin base where
callers relied on one (`DataError` is also a `ValueError`), so one `except CellForgeError` catches every
explained failure and leaves bugs to show as tracebacks. This module imports nothing: the client, which
must stay light, shares it.
"""

from __future__ import annotations


class CellForgeError(Exception):
    """An explained failure: its message is meant for whoever asked (a user, a tenant, the CLI)."""
