"""The LLM layer: every agent question is an `LLMRequest`; a `Backend` answers with a validated model.

Backends: `OpenAIBackend` (any OpenAI-compatible endpoint), `OfflineBackend` (rule-based handlers,
the default), `ReplayBackend` (a recorded run served back in order); `RecordingBackend` wraps any of
them and writes `llm_calls.jsonl` in the run directory. `make_backend(config, handlers, run_dir)`
builds that stack from an `LLMConfig` (flags > environment > config file).
"""

from .accounting import CALLS_FILE, CallRecord, UsageSummary, read_calls, summarize, summarize_run
from .config import LLMConfig, default_config_path, make_backend
from .offline import Handler, OfflineBackend
from .openai_backend import OpenAIBackend
from .recorder import RecordingBackend
from .redact import Redactor
from .replay import ReplayBackend
from .request import (
    Answer,
    Backend,
    CallStats,
    LLMConfigError,
    LLMError,
    LLMInvalidReply,
    LLMRequest,
    LLMUnavailable,
    MissingHandler,
    ReplayedError,
    ReplayExhausted,
    ReplayFileError,
    ReplayMismatch,
    TracedBackend,
)

__all__ = [
    "CALLS_FILE",
    "CallRecord",
    "LLMConfig",
    "OpenAIBackend",
    "RecordingBackend",
    "Redactor",
    "ReplayBackend",
    "UsageSummary",
    "default_config_path",
    "make_backend",
    "read_calls",
    "summarize",
    "summarize_run",
    "Answer",
    "Backend",
    "CallStats",
    "Handler",
    "LLMConfigError",
    "LLMError",
    "LLMInvalidReply",
    "LLMRequest",
    "LLMUnavailable",
    "MissingHandler",
    "OfflineBackend",
    "ReplayedError",
    "ReplayExhausted",
    "ReplayFileError",
    "ReplayMismatch",
    "TracedBackend",
]
