"""A fitted component's state as plain data that `torch.load(weights_only=True)` reads back (tensors, lists,
dicts, numbers, strings), so model.pt runs no pickled code: numpy arrays become tensors (float64 kept
exactly), tables dicts of columns, and a fitted component the record of its attributes. A class may list
attributes that only training needs (`TRANSIENT`); they are not saved and come back as None."""

from typing import Any

import numpy as np
import pandas as pd
import torch


class StateError(TypeError):
    """A fitted attribute of a kind the saved state cannot hold."""


def to_plain(value: Any, classes: dict[str, type], where: str = "model", memo: dict | None = None) -> Any:
    """`value` as plain data; `classes`: the component classes that may appear (by name)."""
    memo = {} if memo is None else memo
    if id(value) in memo:  # the same array in two places is saved once (the memo keeps it alive)
        return memo[id(value)][1]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind in "US":
            out = {"__objects__": [to_plain(v, classes, where, memo) for v in value.ravel().tolist()],
                   "shape": list(value.shape)}
        else:
            out = torch.from_numpy(np.array(value, copy=True))
        memo[id(value)] = (value, out)
    elif isinstance(value, pd.DataFrame):
        out = {"__frame__": {str(c): to_plain(value[c].to_numpy(), classes, where, memo) for c in value.columns},
               "index": to_plain(value.index.to_numpy(), classes, where, memo)}
    elif isinstance(value, tuple):
        out = {"__tuple__": [to_plain(v, classes, f"{where}[{i}]", memo) for i, v in enumerate(value)]}
    elif isinstance(value, list):
        out = [to_plain(v, classes, f"{where}[{i}]", memo) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        out = {"__items__": [[to_plain(k, classes, where, memo), to_plain(v, classes, f"{where}[{k!r}]", memo)]
                             for k, v in value.items()]}
    elif type(value).__name__ in classes:
        skip = getattr(value, "TRANSIENT", ())
        out = {"__object__": type(value).__name__,
               "attrs": {k: to_plain(v, classes, f"{where}.{k}", memo) for k, v in vars(value).items()
                         if k not in skip}}
    else:
        raise StateError(f"{where}: cannot save a {type(value).__name__} in model.pt")
    return out


def from_plain(value: Any, classes: dict[str, type]) -> Any:
    """The inverse of `to_plain`."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, list):
        return [from_plain(v, classes) for v in value]
    if not isinstance(value, dict):
        return value
    if "__objects__" in value:
        out = np.empty(len(value["__objects__"]), dtype=object)
        out[:] = [from_plain(v, classes) for v in value["__objects__"]]
        return out.reshape(value["shape"])
    if "__frame__" in value:
        columns = {c: from_plain(v, classes) for c, v in value["__frame__"].items()}
        return pd.DataFrame(columns, index=from_plain(value["index"], classes))
    if "__tuple__" in value:
        return tuple(from_plain(v, classes) for v in value["__tuple__"])
    if "__items__" in value:
        return {from_plain(k, classes): from_plain(v, classes) for k, v in value["__items__"]}
    cls = classes[value["__object__"]]
    obj = cls.__new__(cls)
    obj.__dict__.update({name: None for name in getattr(cls, "TRANSIENT", ())})
    obj.__dict__.update({k: from_plain(v, classes) for k, v in value["attrs"].items()})
    return obj
