"""The LLM layer: every agent question is an `LLMRequest`; a `Backend` answers with a validated model.

Backends: `OpenAIBackend` (any OpenAI-compatible endpoint), `OfflineBackend` (rule-based handlers,
the default), `ReplayBackend` (a recorded run served back); `FallbackBackend` answers a question from
the rules when the model gives no valid reply for it; `RecordingBackend` wraps any of them and writes
`llm_calls.jsonl` in the run directory. `make_backend(config, handlers, run_dir)` builds that stack
from an `LLMConfig` (flags > environment > config file). `ask_all` asks independent questions at once.
"""

from .accounting import CALLS_FILE, CallRecord, UsageSummary, read_calls, summarize, summarize_run
from .config import LLMConfig, default_config_path, env_vars, make_backend
from .fallback import FallbackBackend
from .offline import Handler, OfflineBackend
from .openai_backend import OpenAIBackend, system_prompt
from .parallel import ask_all
from .parsing import parse_reply, strip_reasoning
from .recorder import RecordingBackend
from .redact import Redactor
from .replay import ReplayBackend
from .request import (
    Answer,
    Backend,
    CallStats,
    Check,
    Exchange,
    Fallback,
    LLMBudgetSpent,
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
    Transcript,
)

__all__ = [
    "CALLS_FILE",
    "CallRecord",
    "Exchange",
    "Fallback",
    "FallbackBackend",
    "LLMBudgetSpent",
    "LLMConfig",
    "OpenAIBackend",
    "RecordingBackend",
    "Redactor",
    "ReplayBackend",
    "UsageSummary",
    "Transcript",
    "ask_all",
    "default_config_path",
    "env_vars",
    "parse_reply",
    "strip_reasoning",
    "system_prompt",
    "make_backend",
    "read_calls",
    "summarize",
    "summarize_run",
    "Answer",
    "Backend",
    "CallStats",
    "Check",
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
