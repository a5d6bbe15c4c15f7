"""The LLM layer: every agent question is an `LLMRequest`; a `Backend` answers with a validated model.

Backends: `OpenAIBackend` (any OpenAI-compatible endpoint), `OfflineBackend` (rule-based handlers,
the default), `ReplayBackend` (a recorded run served back in order); `RecordingBackend` wraps any of
them and writes `llm_calls.jsonl` in the run directory. `make_backend(config, handlers, run_dir)`
builds that stack from an `LLMConfig` (flags > environment > config file).
"""

from .offline import Handler, OfflineBackend
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
