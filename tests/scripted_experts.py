"""A scripted model for the agents' LLM mode: it reads each chat request the way a model would (the schema
named in the system prompt, the JSON context in the user prompt) and answers as the rule-based experts
would, as JSON text. `spoil` lets a test make it answer like a real model sometimes does."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Any

from service.agents import handlers
from service.agents.llm_kinds import CRITIC_SCORES, EXPERT_CRITIQUE, EXPERT_PROPOSAL, TASK_ANALYSIS

KIND_OF_SCHEMA = {"TaskAnalysis": TASK_ANALYSIS, "ExpertProposal": EXPERT_PROPOSAL, "Critique": EXPERT_CRITIQUE,
                  "CriticScores": CRITIC_SCORES}
# (schema name, context, the rules' reply as JSON data, how many times this question was asked) -> text or None
Spoiler = Callable[[str, dict[str, Any], dict[str, Any], int], "str | None"]


class RuleModel:
    def __init__(self, spoil: Spoiler | None = None) -> None:
        self.rules = handlers()
        self.spoil = spoil
        self.seen: list[tuple[str, str]] = []  # (schema name, system prompt), in arrival order
        self._asked: dict[str, int] = {}
        self._lock = threading.Lock()  # the server answers concurrent requests in threads

    def __call__(self, body: dict[str, Any]) -> str:
        system = body["messages"][0]["content"]
        schema_name = re.search(r"JSON schema \((\w+)\)", system).group(1)
        first_user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        context = json.loads(first_user.split("Context (JSON):\n", 1)[1])
        with self._lock:
            self.seen.append((schema_name, system))
            asked = self._asked[first_user + system] = self._asked.get(first_user + system, 0) + 1
        reply = self.rules[KIND_OF_SCHEMA[schema_name]](context).model_dump(mode="json")
        spoiled = self.spoil(schema_name, context, reply, asked) if self.spoil else None
        return json.dumps(reply) if spoiled is None else spoiled
