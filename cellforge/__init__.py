"""CellForge from Python: design, train and honestly score a perturbation model from a notebook or a script.

    import cellforge

    run = cellforge.design(adata, task="Predict expression after knockout of unseen genes",
                           context_key="cell_type", memory="8g")
    run.verdict["summary"]      # does the designed model beat the best baseline?
    run.metrics                 # DataFrame: designed model, delivered predictor, baselines, data ceiling
    run.predictions             # AnnData: one row per test condition, in your obs column names and labels
    run.report                  # report.html (a link in Jupyter)

    cellforge.score(split_dir, predictions)     # the service's evaluator on any predictions
    cellforge.baselines(split_dir)              # every applicable baseline vs the data ceiling

    with cellforge.Sandbox(cellforge.SandboxSpec(memory="2g")) as sb:   # a hardened sandbox of your own
        print(sb.execute("1 + 1").result)

    with cellforge.Client("http://127.0.0.1:8000", api_key) as client:  # a CellForge server
        ...

Heavy parts (the pipeline, the sandbox engine, the client) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .design import DesignRun, Report, design
from .predictions import PROVENANCE_KEY, user_predictions
from .scoring import baselines, score
from .version import __version__

if TYPE_CHECKING:
    from sandbox import SandboxSpec
    from sandbox.sync import SyncSandbox as Sandbox
    from service.client import CellForgeClient as Client

_LAZY = {"Sandbox": ("sandbox.sync", "SyncSandbox"), "SandboxSpec": ("sandbox", "SandboxSpec"),
         "Client": ("service.client", "CellForgeClient")}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'cellforge' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


__all__ = [
    "PROVENANCE_KEY",
    "Client",
    "DesignRun",
    "Report",
    "Sandbox",
    "SandboxSpec",
    "__version__",
    "baselines",
    "design",
    "score",
    "user_predictions",
]
