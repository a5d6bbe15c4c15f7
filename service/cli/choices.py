"""Options with fixed values, as enums: typer shows them as a choice list and refuses a typo in one clean line.

Their values repeat names defined where the data layer loads (kept out of the CLI's import); a test keeps
them equal."""

from __future__ import annotations

from enum import StrEnum


class SchemeChoice(StrEnum):
    """`service.data.splits.SCHEMES`."""

    UNSEEN_PERTURBATION = "unseen-perturbation"
    COMBO = "combo"
    UNSEEN_DRUG = "unseen-drug"
    UNSEEN_DOSE = "unseen-dose"
    UNSEEN_CONTEXT = "unseen-context"


class WhichChoice(StrEnum):
    """The held-out part scored."""

    TEST = "test"
    VAL = "val"


class AtacChoice(StrEnum):
    """`service.data.preprocess.ATAC_TRANSFORMS`."""

    BINARIZE = "binarize"
    TFIDF = "tfidf"
