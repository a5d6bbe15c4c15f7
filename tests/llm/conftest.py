"""Makes the scripted LLM server importable for these tests and registers its `fake_llm` fixture.

The fixture lives in tests/fake_llm_server.py so other packages' tests can use it too; tests run with
--import-mode=importlib, which does not put tests/ on sys.path by itself."""

import sys
from pathlib import Path

_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from fake_llm_server import fake_llm  # noqa: E402,F401  (re-exported as a fixture)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch, tmp_path_factory):
    """Keep the developer's ~/.config/cellforge/config.toml out of these tests."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
