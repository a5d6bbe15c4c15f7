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
    DataTooLarge,
    DuplicateGeneNames,
    InconsistentAnnotation,
    InvalidDose,
    MissingLabels,
    NegativeCounts,
    NoControlCells,
    NonFiniteValues,
    PerturbationColumnNotFound,
    SplitDirectoryError,
    SplitError,
    TooFewCells,
    UnknownColumn,
    UnknownPerturbationKey,
    UnsafeDataFile,
)
from .h5safety import H5Limits
from .isolated import CheckResult, check_isolated, start_forkserver
from .load import Dataset, DatasetLayout, detect_layout, is_control_label, load_dataset, read_h5ad, validate
from .preprocess import (
    binarize,
    clr,
    highly_variable_genes,
    inverse_document_frequency,
    mean_var,
    normalize_log1p,
    pseudobulk,
    tfidf,
    transform_blocks,
)
from .profile import DataProfile, profile_dataset
from .splits import SCHEMES, Split, SplitInfo, assign_conditions, load_split, make_split, perturbation_targets

# Baselines, evaluator and simulator pull in scikit-learn and numba (seconds and ~150 MB at import):
# loaded on first use, so the CLI and the loaders stay quick and lean.
_LAZY = {
    "BASELINES": ("baselines", "BASELINES"),
    "PredictionTask": ("baselines", "PredictionTask"),
    "applicable_baselines": ("baselines", "applicable_baselines"),
    "load_task": ("baselines", "load_task"),
    "run_baselines": ("baselines", "run_baselines"),
    "EvaluationReport": ("evaluate", "EvaluationReport"),
    "Evaluator": ("evaluate", "Evaluator"),
    "PredictionsError": ("evaluate", "PredictionsError"),
    "evaluate": ("evaluate", "evaluate"),
    "SIMULATION_KINDS": ("simulator", "KINDS"),
    "SimulationError": ("simulator", "SimulationError"),
    "simulate": ("simulator", "simulate"),
    "simulate_to_file": ("simulator", "simulate_to_file"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    # Importing a submodule binds it on the package (`evaluate` the module); the export wins.
    for export, (mod, source) in _LAZY.items():
        if mod == module_name:
            globals()[export] = getattr(module, source)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CONDITION",
    "CONTEXT",
    "CONTROL",
    "CheckResult",
    "DOSE",
    "DataError",
    "DataFileError",
    "DataProfile",
    "DataTooLarge",
    "Dataset",
    "DatasetLayout",
    "DuplicateGeneNames",
    "H5Limits",
    "IS_CONTROL",
    "InconsistentAnnotation",
    "InvalidDose",
    "MissingLabels",
    "NO_CONTEXT",
    "NegativeCounts",
    "NoControlCells",
    "NonFiniteValues",
    "PERTURBATION",
    "PerturbationColumnNotFound",
    "SCHEMES",
    "STANDARD_OBS_COLUMNS",
    "Split",
    "SplitDirectoryError",
    "SplitError",
    "SplitInfo",
    "TooFewCells",
    "UnknownColumn",
    "UnknownPerturbationKey",
    "UnsafeDataFile",
    "assign_conditions",
    "binarize",
    "check_isolated",
    "clr",
    "combo_genes",
    "condition_key",
    "condition_keys",
    "detect_layout",
    "highly_variable_genes",
    "inverse_document_frequency",
    "is_control_label",
    "load_dataset",
    "load_split",
    "make_split",
    "mean_var",
    "normalize_log1p",
    "parse_condition_key",
    "perturbation_targets",
    "profile_dataset",
    "pseudobulk",
    "read_h5ad",
    "start_forkserver",
    "tfidf",
    "transform_blocks",
    "validate",
    *_LAZY,  # loaded on first use
]
