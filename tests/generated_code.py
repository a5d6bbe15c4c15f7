"""A rendered bundle's modules imported into the test process. Bundles of different plans share module
names (components, model...), so each load imports them afresh and leaves nothing in `sys.modules`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

BUNDLE_MODULES = ("config", "data", "state", "components", "model", "train")


def load_bundle(code: Path) -> SimpleNamespace:
    """Every public name of the bundle's modules in one namespace (`m.BasePredictor`, `m.ConditionSet`,
    `m.PerturbationModel`, `m.stop_rows`...), plus `m.CONFIG`: the bundle's config.json as its `Config`."""
    for name in BUNDLE_MODULES:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(code))
    try:
        modules = [importlib.import_module(name) for name in BUNDLE_MODULES]
    finally:
        sys.path.remove(str(code))
        for name in BUNDLE_MODULES:
            sys.modules.pop(name, None)
    names: dict[str, Any] = {}
    for module in modules:
        names.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    names["CONFIG"] = names["Config"].load(code / "config.json")
    return SimpleNamespace(**names)


def case_config(m: SimpleNamespace, **changes: Any) -> Any:
    """The bundle's Config with the plan's switches off (not genetic, no dose split, no loss terms), then
    `changes`: a base fitted on hand-built conditions reads only what the case sets."""
    neutral = {"perturbation_kind": "chemical", "split_scheme": "unseen-perturbation", "loss": {}}
    return m.CONFIG.replace(**{**neutral, **changes})
