"""Errors raised by :mod:`biomedap.data`.

Every error derives from :class:`DataError` (itself a ``ValueError``), so callers that do not care
about the cause can catch one class. Messages always name the offending file, class or option and
say what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ClassnameMismatchError",
    "DataError",
    "DatasetRootNotFoundError",
    "EmptyDatasetError",
    "InvalidOptionError",
    "LabelMismatchError",
    "MissingImageError",
    "SplitFileNotFoundError",
    "SplitFormatError",
    "UnknownDatasetError",
    "UnreadableImageError",
]


class DataError(ValueError):
    """Base class of every data-loading error in biomedap."""


class UnknownDatasetError(DataError):
    """A dataset name or key is not in the catalog (and is not a path that exists)."""


class InvalidOptionError(DataError):
    """An option has a value outside its domain (shots, fractions, augmentation kind, ...)."""


class DatasetRootNotFoundError(DataError):
    """The data root or the dataset folder does not exist."""


class SplitFileNotFoundError(DataError):
    """The ``split_<NAME>.json`` file expected next to the images is missing."""


class SplitFormatError(DataError):
    """A split file, CSV or saved few-shot split is not structured as expected."""


class LabelMismatchError(SplitFormatError):
    """Integer labels and class names disagree (one label with two names, or the reverse)."""


class ClassnameMismatchError(DataError):
    """A catalog dataset's split file lists other class names than the catalog."""


class EmptyDatasetError(DataError):
    """No classes or no images were found where some were expected."""


class MissingImageError(DataError):
    """Images listed by a split file or CSV do not exist on disk."""


class UnreadableImageError(DataError):
    """An image file exists (or was expected) but could not be opened and decoded."""
