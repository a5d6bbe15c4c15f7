"""LLMConfig precedence (flags > environment > config file), secrecy of the key, offline dispatch."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from service.llm import (
    FallbackBackend,
    LLMConfig,
    LLMConfigError,
    LLMError,
    LLMRequest,
    MissingHandler,
    OfflineBackend,
    OpenAIBackend,
    RecordingBackend,
    make_backend,
)

KEY = "cf-config-key-8c2e4a6b"


class Verdict(BaseModel):
    accept: bool
    reason: str


def write_config(tmp_path, body: str):
    path = tmp_path / "config.toml"
    path.write_text(body)
    return path


def test_nothing_configured_means_offline(tmp_path):
    config = LLMConfig.resolve(env={}, config_path=write_config(tmp_path, ""))
    assert config.backend == "offline" and config.api_key is None


def test_default_config_file_is_read_from_the_user_config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "cellforge").mkdir()
    write_config(tmp_path / "cellforge", '[llm]\nmodel = "from-user-config"\n')
    config = LLMConfig.resolve(env={})
    assert (config.backend, config.model) == ("openai", "from-user-config")


def test_flags_beat_environment_beat_file(tmp_path):
    path = write_config(tmp_path, '[llm]\nbase_url = "http://file/v1"\nmodel = "file-model"\n'
                                  'api_key = "file-key-123"\nmax_attempts = 7\n')
    env = {"CELLFORGE_LLM_MODEL": "env-model", "CELLFORGE_LLM_API_KEY": KEY,
           "OPENAI_BASE_URL": "http://openai-env/v1"}
    config = LLMConfig.resolve({"model": "flag-model", "base_url": None}, env=env, config_path=path)

    assert config.backend == "openai"
    assert config.model == "flag-model"
    assert config.base_url == "http://openai-env/v1"
    assert config.secret() == KEY
    assert config.max_attempts == 7


def test_cellforge_variables_beat_openai_ones():
    env = {"OPENAI_API_KEY": "openai-key-1", "CELLFORGE_LLM_API_KEY": KEY,
           "OPENAI_BASE_URL": "http://a/v1", "CELLFORGE_LLM_BASE_URL": "http://b/v1",
           "CELLFORGE_LLM_MODEL": "m"}
    config = LLMConfig.resolve(env=env, config_path=None)
    assert (config.secret(), config.base_url) == (KEY, "http://b/v1")


def test_openai_sdk_variables_alone_keep_the_offline_default():
    env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "http://elsewhere/v1"}
    assert LLMConfig.resolve(env=env, config_path=None).backend == "offline"
    assert LLMConfig.resolve(env=env | {"CELLFORGE_LLM_MODEL": "m"}, config_path=None).backend == "openai"


def test_key_never_shows_in_repr_str_or_json():
    config = LLMConfig.resolve({"model": "m", "api_key": KEY}, env={}, config_path=None)
    for text in (repr(config), str(config), config.model_dump_json(), json.dumps(config.model_dump(mode="json"))):
        assert KEY not in text


def test_openai_backend_without_a_model_is_a_clear_error():
    with pytest.raises(LLMConfigError, match="needs a model.*CELLFORGE_LLM_MODEL"):
        LLMConfig.resolve({"backend": "openai"}, env={}, config_path=None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[llm\nmodel=", r"config\.toml is not valid TOML"),
        ('[llm]\nmodle = "x"\n', r"unknown key\(s\) under \[llm\]: modle"),
        ('llm = "openai"\n', r"\[llm\] must be a table"),
        ('[llm]\nbackend = "claude"\n', r"backend: Input should be 'offline' or 'openai' \(from .*config\.toml, got 'claude'\)"),
        ('[llm]\nmodel = "m"\nmax_attempts = 0\n', r"max_attempts: Input should be greater than or equal to 1"),
    ],
)
def test_bad_config_file_is_a_specific_error(tmp_path, body, message):
    with pytest.raises(LLMConfigError, match=message):
        LLMConfig.resolve(env={}, config_path=write_config(tmp_path, body))


def test_bad_flag_names_its_source_and_never_echoes_the_key():
    with pytest.raises(LLMConfigError, match=r"timeout: Input should be greater than 0 \(from flags, got -1\)"):
        LLMConfig.resolve({"timeout": -1}, env={}, config_path=None)
    with pytest.raises(LLMConfigError, match=r"api_key: Input should be a valid string \(from flags\)") as info:
        LLMConfig.resolve({"api_key": ["not", KEY]}, env={}, config_path=None)
    assert KEY not in str(info.value)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(LLMConfigError, match=r"backend: .*\(from CELLFORGE_LLM_BACKEND, got 'gpt'\)"):
        LLMConfig.resolve(env={"CELLFORGE_LLM_BACKEND": "gpt"}, config_path=None)


def test_missing_explicit_config_file(tmp_path):
    with pytest.raises(LLMConfigError, match=r"nope\.toml does not exist"):
        LLMConfig.resolve(env={}, config_path=tmp_path / "nope.toml")


def test_make_backend_builds_the_recording_stack(tmp_path):
    offline = make_backend(LLMConfig(), {"critique": lambda ctx: Verdict(accept=True, reason="ok")}, tmp_path / "a")
    assert isinstance(offline, RecordingBackend) and isinstance(offline.inner, OfflineBackend)
    assert offline.ask(LLMRequest("critique", "s", "u", {}, Verdict)).accept is True

    config = LLMConfig.resolve({"model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key": KEY},
                               env={}, config_path=None)
    online = make_backend(config, {"critique": lambda ctx: Verdict(accept=True, reason="ok")}, tmp_path / "b")
    assert isinstance(online.inner, FallbackBackend) and KEY in online.redactor.secrets
    assert isinstance(online.inner.primary, OpenAIBackend) and online.inner.rules.handlers.keys() == {"critique"}
    assert online.max_parallel == 4
    strict = make_backend(config.model_copy(update={"fallback": False}), {}, tmp_path / "c")
    assert isinstance(strict.inner, OpenAIBackend)

    with pytest.raises(LLMConfigError, match="cannot replay"):
        make_backend(LLMConfig(), {}, tmp_path / "a", replay_from=tmp_path / "a")


def test_offline_dispatches_on_kind_and_names_missing_handlers():
    backend = OfflineBackend({
        "critique": lambda ctx: Verdict(accept=ctx["score"] > 0.5, reason=f"score {ctx['score']}"),
        "review": lambda ctx: {"accept": False, "reason": "from a dict"},
    })
    assert backend.ask(LLMRequest("critique", "", "", {"score": 0.9}, Verdict)) == Verdict(accept=True,
                                                                                         reason="score 0.9")
    assert backend.ask(LLMRequest("review", "", "", {}, Verdict)).reason == "from a dict"
    with pytest.raises(MissingHandler, match=r"no handler for request kind 'plan' \(handlers: critique, review\)"):
        backend.ask(LLMRequest("plan", "", "", {}, Verdict))


def test_offline_handler_returning_the_wrong_shape_is_named():
    backend = OfflineBackend({"critique": lambda ctx: {"accept": "maybe"}})
    with pytest.raises(LLMError, match=r"handler for 'critique' returned dict, not a valid Verdict"):
        backend.ask(LLMRequest("critique", "", "", {}, Verdict))
