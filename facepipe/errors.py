"""Exceptions shared across stages.

Every error raised for bad input names the file and, where there is one, the record, so a user
can find the culprit in a multi-terabyte dataset.
"""

from __future__ import annotations

__all__ = ["FacepipeError", "DataError", "NonFiniteLossError"]


class FacepipeError(Exception):
    """An error caused by bad input or configuration, reported to the user without a traceback."""


class DataError(FacepipeError):
    """Bad input data: a truncated file, a wrong magic, an undecodable image, ..."""

    def __init__(self, message: str, path: str | None = None, record: object | None = None):
        where = []
        if path is not None:
            where.append(f"file {path}")
        if record is not None:
            where.append(f"record {record}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.message = message  # what is wrong, without the location (callers may re-locate it)
        self.path = path
        self.record = record


class NonFiniteLossError(FacepipeError):
    """A loss became NaN or infinite; training stops instead of producing a silent NaN model."""
