"""Independent questions asked at once, bounded by what the backend allows (`max_parallel`)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .request import Backend, LLMRequest, R


def ask_all(backend: Backend, requests: Sequence[LLMRequest[R]]) -> list[R]:
    """The replies to `requests`, in their order. Up to `backend.max_parallel` are in flight together
    (1 for backends that do not say, e.g. the offline rules); the first error in request order is raised
    once every question has finished."""
    bound = min(getattr(backend, "max_parallel", 1), len(requests))
    if bound <= 1:
        return [backend.ask(r) for r in requests]
    with ThreadPoolExecutor(max_workers=bound, thread_name_prefix="llm") as pool:
        futures = [pool.submit(backend.ask, r) for r in requests]
        return [f.result() for f in futures]
