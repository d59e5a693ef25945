"""The one exception type for bad dataset files, so callers can catch data problems apart from
programming errors. Messages always name the offending path."""


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent with its annotations."""
