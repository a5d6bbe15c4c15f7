"""Keeps keys out of everything the LLM layer records or logs."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

REDACTED = "[REDACTED]"

# Shapes of credentials that must never be stored even when they are not the configured key
# (e.g. a key pasted into a prompt, or an upstream error echoing an Authorization header).
_KEY_SHAPES = re.compile(
    r"(?:\bsk-[A-Za-z0-9_\-]{8,}"  # OpenAI-style keys (sk-..., sk-proj-...)
    r"|\bBearer\s+[A-Za-z0-9_\-.=:/+]{8,})"
)
_MIN_SECRET_LEN = 4  # shorter "keys" (e.g. "x" for local servers) would shred every text


class Redactor:
    """Replaces the configured secrets and anything shaped like an API key with `[REDACTED]`."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, REDACTED)
        return _KEY_SHAPES.sub(REDACTED, value)

    def data(self, value: Any) -> Any:
        """A JSON-able deep copy of `value` with every string redacted (keys of dicts included)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.data(v) for v in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        # Agents put models, dataclasses, numpy values and Paths in contexts; keep their structure.
        if isinstance(value, BaseModel):
            return self.data(value.model_dump(mode="json"))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return self.data(dataclasses.asdict(value))
        for converter in ("tolist", "item"):  # numpy arrays, then numpy scalars
            convert = getattr(value, converter, None)
            if callable(convert):
                try:
                    return self.data(convert())
                except (TypeError, ValueError):
                    pass
        return self.text(str(value))
