"""The LLM tests' fixtures (`fake_llm` comes from tests/fake_llm_server.py via the root conftest)."""

import pytest


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch, tmp_path_factory):
    """Keep the developer's ~/.config/cellforge/config.toml out of these tests."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
