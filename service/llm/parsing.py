"""Reading a model's reply leniently: the JSON object is found inside reasoning blocks, fences and prose.

Real models put `<think>…</think>` reasoning (with braces) before the answer, wrap it in ```json fences,
or add a sentence around it despite the prompt. `parse_reply` tries, in order: the text without
reasoning, each fenced block, then every JSON object embedded in the text; the first one that validates
wins. When none does, the error names the schema problem of the most plausible object (the largest one
that parsed as JSON), or the JSON syntax error when no object parsed at all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

_REASONING = re.compile(r"<(think|thinking|reasoning)>.*?</\1>", re.DOTALL | re.IGNORECASE)
_CLOSING = re.compile(r"</(?:think|thinking|reasoning)>", re.IGNORECASE)
_FENCED = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_MAX_EMBEDDED = 200  # '{' positions tried; a long invalid reply (code with braces) must not cost O(n²)


def strip_reasoning(content: str) -> str:
    """The reply without reasoning blocks; a reply whose opening tag was dropped by the server keeps only
    what follows the last closing tag."""
    text = _REASONING.sub("", content)
    closing = list(_CLOSING.finditer(text))
    return text[closing[-1].end():] if closing else text


def _candidates(content: str) -> Iterator[str]:
    text = strip_reasoning(content).strip()
    yield text
    for block in _FENCED.finditer(text):
        yield block.group(1).strip()
    decoder = json.JSONDecoder()
    start, tried = text.find("{"), 0
    while start >= 0 and tried < _MAX_EMBEDDED:
        tried += 1
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            yield text[start:end]
        start = text.find("{", end)


def parse_reply(content: str, schema: type[M]) -> M:
    """The first JSON object in `content` that validates as `schema`; the most telling error otherwise."""
    syntax_error: ValidationError | None = None
    best: tuple[int, ValidationError] | None = None
    seen: set[str] = set()
    for candidate in _candidates(content):
        if candidate in seen:
            continue
        seen.add(candidate)
        try:
            return schema.model_validate_json(candidate)
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                syntax_error = syntax_error or exc
            elif best is None or len(candidate) > best[0]:
                best = (len(candidate), exc)
    if best is not None:
        raise best[1]
    assert syntax_error is not None  # the stripped text itself is always tried
    raise syntax_error


def describe(exc: ValueError) -> str:
    """A validation error as the model is shown it: one `- path: message` line per problem."""
    if not isinstance(exc, ValidationError):
        return f"- {exc}"
    lines = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"- {where}: {err['msg']}")
    return "\n".join(lines)
