"""The error body every HTTP answer above 399 carries, and how a validation failure is put into words."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError


class ErrorDetail(BaseModel):
    type: str  # the service's error class: NotFound, QuotaExceeded, BadRequest, UnknownFields, ...
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def unknown_fields(errors: Sequence[Mapping[str, Any]]) -> list[str]:
    """The dotted names of fields a model does not know (pydantic's `extra_forbidden`)."""
    return [".".join(str(p) for p in e["loc"]) for e in errors if e["type"] == "extra_forbidden"]


def problems(errors: Sequence[Mapping[str, Any]] | ValidationError) -> str:
    """`field: what is wrong; ...` for a validation failure."""
    if isinstance(errors, ValidationError):
        errors = errors.errors()
    return "; ".join(_problem(e) for e in errors)


def _problem(error: Mapping[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "body"
    if error["type"] == "union_tag_invalid":  # a tagged union's tag (e.g. a regression's `kind`) with no match
        ctx = error["ctx"]
        tags = [t.strip() for t in ctx["expected_tags"].split(",")]
        choices = f"{', '.join(tags[:-1])} or {tags[-1]}" if len(tags) > 1 else tags[0]
        return f"{ctx['discriminator'].strip(chr(39))}: expected {choices}, got {ctx['tag']!r}"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"
