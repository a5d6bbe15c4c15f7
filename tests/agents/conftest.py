"""Fixtures of the agents' tests: the offline backend and the scripted LLM server."""

import pytest

from service.agents import handlers
from service.llm import OfflineBackend


@pytest.fixture
def offline() -> OfflineBackend:
    return OfflineBackend(handlers())
