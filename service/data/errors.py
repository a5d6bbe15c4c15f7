"""One exception family for bad datasets and splits.

Every error names the file, column or value at fault and says what was expected, so that a user
(or an agent) can fix the input without reading a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


PREVIEW_CHARS = 60


def preview(values: Iterable[object], limit: int = 12) -> str:
    """`'a', 'b', 'c' (+5 more)`: a bounded listing for error messages; long values are cut to
    PREVIEW_CHARS, so an error never echoes more than a short excerpt of what a file holds."""
    items = [repr(_cut(str(v))) for v in values]
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f" (+{len(items) - limit} more)"
    return shown or "(none)"


def _cut(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS - 3] + "..."


class DataError(ValueError):
    """Base class: the dataset (or split directory) cannot be used as given."""


class DataFileError(DataError):
    """The file is missing, unreadable, not HDF5, or not an AnnData file."""


class UnsafeDataFile(DataFileError):
    """The file reaches outside itself (external storage, external links, virtual datasets), is not a
    regular file, or declares data it never wrote: refused before any of its data is read."""


class DataTooLarge(DataError):
    """The file declares more cells, features or bytes than the configured limits (`H5Limits`) allow."""


class PerturbationColumnNotFound(DataError):
    """No obs column looks like a perturbation column."""


class UnknownPerturbationKey(DataError):
    """The `--perturbation-key` given is not an obs column."""


class UnknownColumn(DataError):
    """A dose/context/batch key given explicitly is not an obs column."""


class NoControlCells(DataError):
    """The perturbation column holds no control label."""


class NonFiniteValues(DataError):
    """X contains NaN or infinite values."""


class NegativeCounts(DataError):
    """The expression matrix holds negative values where counts or log-normalized data are expected."""


class DuplicateGeneNames(DataError):
    """var_names are not unique."""


class TooFewCells(DataError):
    """Some conditions have fewer cells than the threshold."""


class InvalidDose(DataError):
    """The dose column holds values that are not numbers."""


class SplitError(DataError):
    """The split scheme cannot be applied to this dataset (or its options are inconsistent)."""


class SplitDirectoryError(DataError):
    """A split directory is incomplete or its split.json is malformed."""


class MissingLabels(DataError):
    """Some cells have no perturbation label (NaN or empty)."""


class InconsistentAnnotation(DataError):
    """A perturbation carries different annotations (targets / pathway) on different cells."""
