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
)
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
from .splits import SCHEMES, Split, SplitInfo, assign_conditions, load_split, make_split
from .baselines import BASELINES, PredictionTask, applicable_baselines, load_task, run_baselines
from .evaluate import EvaluationReport, Evaluator, PredictionsError, evaluate
from .simulator import KINDS as SIMULATION_KINDS, SimulationError, simulate
