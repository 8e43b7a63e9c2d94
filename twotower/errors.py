"""Exceptions shared by the training and serving sides.

Every error names what is wrong: the file, the column, the row or the id.
"""

from __future__ import annotations


class TwoTowerError(Exception):
    """Base class of every error twotower raises on purpose."""


class DataValidationError(TwoTowerError, ValueError):
    """An input table breaks the schema."""


class MissingFileError(DataValidationError, FileNotFoundError):
    """An input file does not exist."""


class MissingColumnError(DataValidationError):
    """A required column is absent from a table."""


class InvalidValueError(DataValidationError):
    """A value cannot be parsed or is missing (NaN id, unparseable timestamp, ...)."""


class DuplicateIdError(DataValidationError):
    """An id appears more than once where it must be unique."""


class UnknownIdError(DataValidationError, KeyError):
    """An id refers to an entity that the referenced table does not hold."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class EmptyTableError(DataValidationError):
    """A table has no rows."""


class PreparedDataError(TwoTowerError, ValueError):
    """A prepared directory (the output of ``twotower prepare`` or ``twotower spark
    prepare``) is missing, incomplete, of another format, or cannot serve the run's
    settings."""


class BundleError(TwoTowerError):
    """A bundle is missing, corrupt, or does not match this runtime."""


class RequestError(TwoTowerError, ValueError):
    """A retrieval call has an invalid argument (k <= 0, bad shape, ...)."""
