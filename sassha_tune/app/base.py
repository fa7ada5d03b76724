"""What the app's functions share: where their progress lines go (``log``: by default the
``sassha_tune`` logger at INFO level, silent unless the caller configured logging) and a storage
fault (a corrupt, read-only, full or locked database) as one line."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import StorageError, UserError

__all__ = ["Log", "default_log", "one_line_storage_faults", "storage_fault_line"]

Log = Callable[[str], None]
F = TypeVar("F", bound=Callable[..., Any])

_logger = logging.getLogger("sassha_tune")


def default_log(message: str) -> None:
    """A progress line to the ``sassha_tune`` logger (INFO)."""
    _logger.info(message)


def storage_fault_line(exc: BaseException) -> str | None:
    """The one line that says what went wrong when ``exc`` is a storage fault (a corrupt, read-only,
    full or locked database; the storage named, passwords masked), else None."""
    from ..study.storage import storage_fault

    return storage_fault(exc)


def one_line_storage_faults(fn: F) -> F:
    """``fn`` raising a storage fault raises :class:`~sassha_tune.errors.StorageError` with its
    one line (:func:`storage_fault_line`) instead; anything else passes as raised."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except Exception as exc:
            message = storage_fault_line(exc)
            if message is None:
                raise
            raise StorageError(message) from None

    return wrapper  # type: ignore[return-value]
