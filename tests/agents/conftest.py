"""Fixtures of the agents' tests: the offline backend and the scripted LLM server."""

import sys
from pathlib import Path

import pytest

for _path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from fake_llm_server import fake_llm  # noqa: E402,F401  (re-exported as a fixture)

from service.agents import handlers  # noqa: E402
from service.llm import OfflineBackend  # noqa: E402


@pytest.fixture
def offline() -> OfflineBackend:
    return OfflineBackend(handlers())
