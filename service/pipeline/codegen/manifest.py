"""What generated code declares it implements of the plan, and the service's check of that declaration.

config.json carries an `implements` block, written by the code generator and kept by the model:

    "implements": {"choices": {"architecture.base_predictor": "linear_ridge", ...},
                   "config_keys": {"training.lr": "lr", "loss.kind": "loss.kind", ...},
                   "custom": ["perturbation_attention"]}

`choices` are plan fields built into the code (the encoder, the base predictor); `config_keys` name the
config.json entry (dotted path) the code reads for each hyper-parameter; `custom` names the plan's
components outside the design space (`architecture.custom_components`, LLM mode) that the code implements.
The check: every field below is declared, each declared choice and each config value equals the plan's,
and each config key is read by the code (its name appears in a module as a string literal, a `Config`
field or an attribute read); `custom` lists exactly the plan's custom components, each named in a module
of the code. A mismatch is a problem the debugger is shown, never a crash.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from service.agents import Plan

IMPLEMENTS = "implements"
CUSTOM = "custom"
CUSTOM_FIELD = "architecture.custom_components"
CHOICES = ("architecture.perturbation_encoder", "architecture.base_predictor")
CONFIG_FIELDS = {
    "loss.kind": "loss.kind",
    "loss.de_weighting": "loss.de_weighting",
    "architecture.residual_delta": "residual_delta",
    "architecture.hidden_width": "hidden_width",
    "architecture.depth": "depth",
    "architecture.dropout": "dropout",
    "training.optimizer": "optimizer",
    "training.lr": "lr",
    "training.weight_decay": "weight_decay",
    "training.batch_size": "batch_size",
    "training.epochs": "epochs",
    "training.grad_clip": "grad_clip",
}
_MISSING = object()


def implements_block(plan: Plan) -> dict[str, Any]:
    """The declaration of the vetted bundle: the plan's choices and the template's config keys. It implements
    no custom component (`custom` is empty): those are written by the LLM code generator."""
    return {"choices": {path: plan_value(plan, path) for path in CHOICES}, "config_keys": dict(CONFIG_FIELDS),
            CUSTOM: []}


def plan_value(plan: Plan, path: str) -> Any:
    section, _, name = path.partition(".")
    return getattr(getattr(plan, section), name)


def _lookup(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def read_config(files: dict[str, str]) -> tuple[dict[str, Any] | None, str | None]:
    """config.json as a dict, or (None, why it is not one)."""
    text = files.get("config.json")
    if text is None:
        return None, "the bundle has no config.json"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, (f"config.json is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                      "JSON has no comments and no trailing commas")
    if not isinstance(config, dict):
        return None, f"config.json holds a {type(config).__name__}, not a JSON object"
    return config, None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


def _code(files: dict[str, str]) -> list[str]:
    """The bundle's modules, tests left out (a test naming a key or a component implements nothing)."""
    return [text for file, text in files.items() if file.endswith(".py") and not file.startswith("test_")]


def check_custom(plan: Plan, files: dict[str, str]) -> list[str]:
    """Problems of the `custom` declaration against the plan's custom components: each one the plan asks
    for is declared and named in the code, and nothing else is declared. A bundle without the declaration
    is fine for a plan without custom components (bundles written before it existed)."""
    config, why = read_config(files)
    if config is None:
        return [why or "config.json unreadable"]
    block = config.get(IMPLEMENTS)
    wanted = {c.name: c for c in plan.architecture.custom_components}
    declared = block.get(CUSTOM, []) if isinstance(block, dict) else []
    if not isinstance(declared, list) or not all(isinstance(n, str) for n in declared):
        return [f"{IMPLEMENTS}.{CUSTOM} must be a list of the custom components' names, got {declared!r}"]
    problems = []
    for name, component in wanted.items():
        if name not in declared:
            problems.append(f"the plan asks for the custom component {name!r} ({component.role}: "
                            f"{component.description[:200]}) but {IMPLEMENTS}.{CUSTOM} does not declare it: "
                            f"implement it within the contract and list its name")
        elif not any(re.search(rf"\b{re.escape(name)}\b", text) for text in _code(files)):
            problems.append(f"{IMPLEMENTS}.{CUSTOM} declares {name!r} but no module of the bundle names it "
                            "(name the class or function that implements it after the component)")
    extra = [n for n in declared if n not in wanted]
    if extra:
        problems.append(f"{IMPLEMENTS}.{CUSTOM} declares {extra}, which the plan does not ask for "
                        f"(the plan's: {sorted(wanted)})")
    return problems


def _read_by_code(files: dict[str, str], key: str) -> bool:
    name = re.escape(key.rsplit(".", 1)[-1])
    read = re.compile(rf"""["']{name}["']|\.{name}\b|^\s+{name}\s*:""", re.M)
    return any(read.search(text) for text in _code(files))


def check_implements(plan: Plan, files: dict[str, str]) -> list[str]:
    """Problems of the bundle against the plan: config.json unreadable, the declaration missing or
    incomplete, a declared choice or a config value that is not the plan's, a key no code reads."""
    config, why = read_config(files)
    if config is None:
        return [why or "config.json unreadable"]
    block = config.get(IMPLEMENTS)
    if not isinstance(block, dict) or not isinstance(block.get("choices"), dict) \
            or not isinstance(block.get("config_keys"), dict):
        return [f"config.json lacks the `{IMPLEMENTS}` block ({{\"choices\": {{...}}, \"config_keys\": {{...}}}}) "
                f"declaring which plan fields the code implements; expected: {json.dumps(implements_block(plan))}"]
    choices, keys = block["choices"], block["config_keys"]
    problems = []
    for path in CHOICES:
        want = plan_value(plan, path)
        if path not in choices:
            problems.append(f"{IMPLEMENTS}.choices does not declare {path} (the plan's: {want!r})")
        elif not _same(choices[path], want):
            problems.append(f"plan {path} is {want!r} but the code declares {choices[path]!r}")
    for path in CONFIG_FIELDS:
        want = plan_value(plan, path)
        key = keys.get(path)
        if not isinstance(key, str):
            problems.append(f"{IMPLEMENTS}.config_keys does not name the config.json key read for {path}")
            continue
        have = _lookup(config, key)
        if have is _MISSING:
            problems.append(f"{path}: config.json has no key {key!r}")
        elif not _same(have, want):
            problems.append(f"plan {path} is {want!r} but config.json {key} is {have!r}")
        elif not _read_by_code(files, key):
            problems.append(f"{path}: config.json key {key!r} is declared but no module of the "
                            "bundle reads it")
    return problems + check_custom(plan, files)


def implemented(files: dict[str, str]) -> dict[str, Any]:
    """What the code declares it ran: each declared plan field and its value (for the report)."""
    config, _ = read_config(files)
    block = (config or {}).get(IMPLEMENTS)
    if not isinstance(block, dict):
        return {}
    out = dict(block.get("choices") or {})
    for path, key in (block.get("config_keys") or {}).items():
        value = _lookup(config, key) if isinstance(key, str) else _MISSING
        if value is not _MISSING:
            out[path] = value
    if isinstance(block.get(CUSTOM), list):
        out[CUSTOM_FIELD] = list(block[CUSTOM])
    return out


def plan_following(plan: Plan, files: dict[str, str], changed: set[str]) -> Plan:
    """The plan after config.json changes to the top-level keys `changed` (a debugger's lower lr, an
    improve step's): the plan fields whose declared config key was changed take the new value, so the
    node's plan stays what its code runs. Left as it was when a value does not fit the plan (the check
    then reports the mismatch)."""
    config, _ = read_config(files)
    block = (config or {}).get(IMPLEMENTS)
    keys = block.get("config_keys") if isinstance(block, dict) else None
    if not isinstance(keys, dict) or not changed:
        return plan
    data = plan.model_dump()
    for path, key in keys.items():
        if path not in CONFIG_FIELDS or not isinstance(key, str) or key.split(".")[0] not in changed:
            continue
        value = _lookup(config, key)
        if value is not _MISSING:
            section, _, name = path.partition(".")
            data[section][name] = value
    try:
        return Plan.model_validate(data)
    except ValidationError:
        return plan
