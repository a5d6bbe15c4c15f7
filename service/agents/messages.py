"""The messages of the expert discussion: what each LLM request of the Method Design step answers with.

The offline rule-based experts and an LLM return these same models, so the discussion engine, the
transcripts and the plan synthesis never know which backend spoke.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.agents.plan import ArgumentRef, plan_field_paths, validate_field_value

# list[dict[str, str]]: architecture.custom_components, kept as plain JSON data (checked as CustomComponents by
# `validate_field_value`) so that proposals, drafts and critiques stay JSON-able as they are.
FieldValue = bool | int | float | str | list[str] | list[dict[str, str]] | None

_STRICT = ConfigDict(extra="forbid")


def plain(value: Any) -> Any:
    """A checked field value as JSON data (custom components as dicts)."""
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return [v.model_dump(mode="json") for v in value]
    return value


class FieldChoice(BaseModel):
    """One plan field an expert sets, with the argument for it (grounded in profile numbers)."""

    model_config = _STRICT
    field: str = Field(description='"section.field" of the Plan, e.g. "architecture.hidden_width"')
    value: FieldValue
    argument: str = Field(min_length=1, description="why, quoting the numbers of the data profile")
    source: ArgumentRef | None = Field(
        default=None, description="set when the value was adopted from another expert's critique"
    )

    @model_validator(mode="after")
    def _value_fits_field(self) -> FieldChoice:
        self.value = plain(validate_field_value(self.field, self.value))
        return self


class ExpertProposal(BaseModel):
    model_config = _STRICT
    summary: str = Field(min_length=1)
    choices: list[FieldChoice] = Field(min_length=1)
    confidence: float = Field(ge=0.0, le=1.0, description="the expert's own confidence in this proposal")

    def values(self) -> dict[str, FieldValue]:
        return {c.field: c.value for c in self.choices}


class CritiqueItem(BaseModel):
    model_config = _STRICT
    field: str = Field(description='the "section.field" the point is about')
    stance: Literal["support", "object"]
    severity: float = Field(ge=0.0, le=1.0, description="how much it matters (objections ≥ 0.5 are acted on)")
    argument: str = Field(min_length=1)
    suggested_value: FieldValue = None

    @model_validator(mode="after")
    def _suggestion_fits_field(self) -> CritiqueItem:
        if self.field not in plan_field_paths():
            raise ValueError(f"critique names unknown plan field {self.field!r}")
        if self.suggested_value is not None:
            self.suggested_value = plain(validate_field_value(self.field, self.suggested_value))
        return self


class Critique(BaseModel):
    model_config = _STRICT
    items: list[CritiqueItem] = Field(default_factory=list)


class ProposalScore(BaseModel):
    model_config = _STRICT
    expert: str
    score: float = Field(ge=0.0, le=1.0)
    reasons: list[str] = Field(default_factory=list)


class CriticScores(BaseModel):
    model_config = _STRICT
    scores: list[ProposalScore]
