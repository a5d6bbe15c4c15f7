"""Which backend a run uses: flags > environment > config file, and the recording stack built from it."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from .fallback import FallbackBackend
from .offline import Handler, OfflineBackend
from .openai_backend import OpenAIBackend, ResponseFormat, TokenProgress
from .recorder import RecordingBackend
from .replay import ReplayBackend
from .request import Backend, LLMConfigError


# Environment variables, most specific first: CELLFORGE_* wins over the SDK's conventional names.
# Every other setting has one variable, CELLFORGE_LLM_<NAME> (see `env_vars`).
_SDK_ENV_VARS: dict[str, tuple[str, ...]] = {
    "base_url": ("OPENAI_BASE_URL",),
    "api_key": ("OPENAI_API_KEY",),
}


class LLMConfig(BaseModel):
    """How to reach the LLM. `backend` defaults to `offline` unless an endpoint or model is configured.

    The key is a `SecretStr`: `repr()`, `str()` and JSON dumps show `**********`."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["offline", "openai"] = "offline"
    base_url: str | None = None
    model: str | None = None
    api_key: SecretStr | None = None
    timeout: float = Field(120.0, gt=0, description="seconds per HTTP request")
    max_attempts: int = Field(5, ge=1, description="HTTP attempts per completion, retries included")
    max_seconds: float = Field(300.0, gt=0, description="total time budget per completion, waits included")
    max_reasks: int = Field(2, ge=0, description="re-asks, quoting the problem, after a reply that does not "
                                                 "validate; then the offline rules answer that question")
    response_format: ResponseFormat = Field(
        "json_schema", description="structured output asked for (stepping down json_schema > json_object > "
                                   "none when the server refuses it)")
    temperature: float | None = 0.0
    max_tokens: int | None = Field(8192, ge=16, description="output cap per completion (a question may raise it)")
    max_continuations: int = Field(2, ge=0, description="continuations of a reply cut by the output cap")
    token_budget: int | None = Field(None, ge=1, description="tokens one question may spend, re-asks included")
    stream: bool = Field(False, description="stream replies: live token progress, and a slow reply is not cut "
                                            "by the per-request read timeout")
    total_minutes: float | None = Field(None, gt=0, description="wall time all of a run's LLM calls may take "
                                                              "together; then the offline rules answer")
    max_parallel: int = Field(4, ge=1, le=64, description="independent questions asked at once")
    fallback: bool = Field(True, description="answer a question from the offline rules when the model "
                                             "gives no valid reply for it")
    codegen: Literal["edits", "files"] = Field(
        "edits", description="code generation: 'edits' (one reply: edits / whole files against the vetted "
                             "bundle) or 'files' (one question per file, each reply one file with its own output cap)")

    @classmethod
    def resolve(
        cls,
        flags: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        config_path: Path | str | None = None,
    ) -> LLMConfig:
        """Merge sources, highest first: `flags` (None values ignored), `env` (default: os.environ),
        the `[llm]` table of `config_path` (default: `default_config_path()` if it exists)."""
        env = os.environ if env is None else env
        merged: dict[str, Any] = {}
        sources: dict[str, str] = {}
        file_source, file_values = _from_file(config_path)
        merged.update(file_values)
        sources.update(dict.fromkeys(file_values, file_source))
        for field, (value, variable) in _from_env(env).items():
            merged[field] = value
            sources[field] = variable
        flag_values = {k: v for k, v in (flags or {}).items() if v is not None}
        merged.update(flag_values)
        sources.update(dict.fromkeys(flag_values, "flags"))
        # An endpoint or model configured for CellForge selects the openai backend; the SDK's own
        # OPENAI_* variables alone do not, since they are often set for other tools.
        if "backend" not in merged and any(
            merged.get(f) and not sources[f].startswith("OPENAI_") for f in ("base_url", "model")
        ):
            merged["backend"] = "openai"
        try:
            config = cls.model_validate(merged)
        except ValidationError as exc:
            raise LLMConfigError(f"invalid LLM configuration: {_describe(exc, sources)}") from None
        if config.backend == "openai" and not config.model:
            raise LLMConfigError(
                "the openai backend needs a model: pass --llm-model, set CELLFORGE_LLM_MODEL, "
                "or put `model = \"...\"` under [llm] in the config file"
            )
        return config

    def secret(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None


def default_config_path() -> Path:
    """`$XDG_CONFIG_HOME/cellforge/config.toml`, i.e. `~/.config/cellforge/config.toml` by default."""
    base = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "cellforge" / "config.toml"


def env_vars(field: str) -> tuple[str, ...]:
    """The environment variables of a setting, most specific first."""
    return (f"CELLFORGE_LLM_{field.upper()}", *_SDK_ENV_VARS.get(field, ()))


def make_backend(
    config: LLMConfig,
    handlers: Mapping[str, Handler],
    run_dir: Path,
    *,
    replay_from: Path | None = None,
    on_tokens: TokenProgress | None = None,
) -> RecordingBackend:
    """The backend a run uses, recording into `run_dir/llm_calls.jsonl`.

    With `replay_from`, the recorded calls of that earlier run are served instead of asking anyone.
    A model's questions fall back to the offline `handlers` one by one unless `config.fallback` is off."""
    inner: Backend
    if replay_from is not None:
        if Path(replay_from).resolve() == Path(run_dir).resolve():
            raise LLMConfigError(f"cannot replay {replay_from} into itself: record into a new run directory")
        inner = ReplayBackend(replay_from)
    elif config.backend == "offline":
        inner = OfflineBackend(handlers)
    else:
        inner = OpenAIBackend(
            config.base_url,
            config.model or "",
            config.secret(),
            timeout=config.timeout,
            max_attempts=config.max_attempts,
            max_seconds=config.max_seconds,
            max_reasks=config.max_reasks,
            response_format=config.response_format,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            max_continuations=config.max_continuations,
            token_budget=config.token_budget,
            max_parallel=config.max_parallel,
            total_seconds=config.total_minutes * 60 if config.total_minutes else None,
            stream=config.stream,
            on_tokens=on_tokens,
        )
        if config.fallback:
            inner = FallbackBackend(inner, OfflineBackend(handlers))
    return RecordingBackend(inner, run_dir, secrets=[config.secret()])


def _from_env(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """field -> (value, the variable it came from)."""
    found: dict[str, tuple[str, str]] = {}
    for field in LLMConfig.model_fields:
        for name in env_vars(field):
            if env.get(name):
                found[field] = (env[name], name)
                break
    return found


def _from_file(config_path: Path | str | None) -> tuple[str, dict[str, Any]]:
    explicit = config_path is not None
    path = (Path(config_path) if config_path is not None else default_config_path()).expanduser()
    if not path.is_file():
        if explicit:
            raise LLMConfigError(f"config file {path} does not exist")
        return str(path), {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LLMConfigError(f"config file {path} is not valid TOML: {exc}") from None
    section = data.get("llm", {})
    if not isinstance(section, dict):
        raise LLMConfigError(f"config file {path}: [llm] must be a table, got {type(section).__name__}")
    unknown = sorted(set(section) - set(LLMConfig.model_fields))
    if unknown:
        raise LLMConfigError(
            f"config file {path}: unknown key(s) under [llm]: {', '.join(unknown)} "
            f"(expected: {', '.join(LLMConfig.model_fields)})"
        )
    return str(path), dict(section)


def _describe(exc: ValidationError, sources: dict[str, str]) -> str:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        # Never echo what was given for the key, even when it is malformed.
        given = "" if field == "api_key" else f", got {err.get('input')!r}"
        problems.append(f"{field}: {err['msg']} (from {sources.get(field, 'defaults')}{given})")
    return "; ".join(problems)
