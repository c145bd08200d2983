"""The data layer's errors, defined once.

- ``DataError``: the data on disk does not match what the run needs (missing
  split, empty class folder, a labeled list naming absent files, a damaged
  conversion). Programs report it as a one-line error and exit 2.
- ``BadImageError``: one image cannot be read or decoded; the message names it.
- ``LoaderFailure``: the loader's machinery failed (a worker process or a
  pipeline thread died); the message says which stream or file.
"""
from __future__ import annotations


class DataError(ValueError):
    """The data on disk does not match what the run needs."""


class BadImageError(DataError):
    """An image that cannot be read or decoded; the message names it."""


class LoaderFailure(RuntimeError):
    """The loader's machinery failed (a worker process or pipeline thread died);
    the message says which stream or file, the cause is chained."""
