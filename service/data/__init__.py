"""The perturbation data layer: loading, validation, profile, preprocessing, splits, evaluation."""

from .conditions import (
    CONDITION,
    CONTEXT,
    CONTROL,
    DOSE,
    IS_CONTROL,
    NO_CONTEXT,
    PERTURBATION,
    STANDARD_OBS_COLUMNS,
    combo_genes,
    condition_key,
    condition_keys,
    parse_condition_key,
)
from .errors import (
    DataError,
    DataFileError,
    DuplicateGeneNames,
    InvalidDose,
    NegativeCounts,
    NoControlCells,
    NonFiniteValues,
    PerturbationColumnNotFound,
    SplitDirectoryError,
    SplitError,
    TooFewCells,
    UnknownColumn,
    UnknownPerturbationKey,
)
