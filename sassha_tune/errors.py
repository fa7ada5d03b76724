"""Errors that are the user's to fix.

Anything raised as a :class:`UserError` is printed by the CLI as one line (no traceback) and the
process exits with code 2. Everything else is a bug in sassha-tune and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config, a search space, a data path, a storage URL, a CLI argument."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line only: the CLI prints it as is.
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """A config or search-space file is malformed. The message names the file and key path."""


class DataError(UserError):
    """A dataset cannot be found or read. The message names the path looked at and how to get it."""


class StorageError(UserError):
    """A storage URL is unusable or a study does not exist. Credentials are never in the message."""
