"""The files a command writes where its user said (``--out``, ``--metrics-out``, ``--save``):
checked before any work is done, written whole or not at all; an error names the option."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

__all__ = ["check_output", "write_output"]


def check_output(path: Path, option: str, *, directory: bool = True) -> None:
    """``path`` is no symbolic link and (``directory``) its directory exists: else a one-line
    :class:`UserError` naming ``option``, before anything is written."""
    from ..report.files import refuse_link

    refuse_link(path, option)
    if directory and not path.parent.is_dir():
        raise UserError(f"{option} {path}: directory {path.parent} does not exist")


def write_output(path: Path, text: str, option: str) -> None:
    """``text`` written to ``path`` atomically (:func:`~sassha_tune.report.files.write_user_file`)."""
    from ..report.files import write_user_file

    write_user_file(path, text, option)
