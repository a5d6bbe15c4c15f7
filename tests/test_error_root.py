"""One error root for the service: every exception class the `service` package defines derives from
`CellForgeError`, so the CLI and the servers can handle explained failures with one `except`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import service
from service.errors import CellForgeError

# Control flow, not failures: they stop a job or a phase and never reach a user.
SIGNALS = {"service.jobs.runner.JobCancelled", "service.jobs.design._Stop"}


def _service_exceptions() -> dict[str, type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(service.__path__, "service."):
        if ".migrations" in info.name:
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def test_every_service_error_derives_from_cellforge_error():
    exceptions = _service_exceptions()
    assert "service.data.errors.DataError" in exceptions and "service.api.errors.QuotaExceeded" in exceptions
    strays = sorted(name for name, cls in exceptions.items()
                    if name not in SIGNALS and not issubclass(cls, CellForgeError))
    assert strays == []


def test_errors_keep_the_builtin_bases_callers_catch():
    from service.data import DataError
    from service.pipeline import PipelineError

    assert issubclass(DataError, ValueError) and issubclass(PipelineError, RuntimeError)
