"""Writing report files atomically: a reader (a browser, a CI job, a second ``report``) sees the
old file or the new one, never half of one, and a full disk or a crash leaves the old file intact.
New files get the permissions the umask allows (0644 under the usual 022), as files written with
``open`` do: a report is meant to be shared. The file is renamed over the old one, so a symbolic
link there is replaced, never written through; a file the user names (``export --out``,
``train --metrics-out``: :func:`write_user_file`) must not be a link at all."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sassha_tune.errors import UserError

__all__ = ["Written", "refuse_link", "replaced", "write_text", "write_user_file"]


@dataclass
class Written:
    """What ``report`` or ``compare`` wrote, for Python callers (``sassha_tune.report(...)``,
    ``sassha_tune.compare(...)``): the folder, the files, the markdown text, ``summary.json``'s
    data and the tables (headers, rows of text cells) by title. In Jupyter it shows as its markdown."""

    out_dir: Path
    files: list[Path]
    markdown: str
    summary: dict[str, Any]
    tables: dict[str, tuple[list[str], list[list[str]]]] = field(default_factory=dict)

    def _repr_markdown_(self) -> str:
        return self.markdown


@contextlib.contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces
    ``path`` in one step (``os.replace``), otherwise it is removed."""
    # not tempfile.mkstemp: it creates the file 0600 whatever the umask, and os.replace keeps that
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text, encoding="utf-8")``, atomically."""
    with replaced(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def refuse_link(path: Path, option: str) -> None:
    """A :class:`UserError` naming the command-line ``option`` when ``path`` is a symbolic link."""
    if path.is_symlink():
        raise UserError(f"{option} {path}: is a symbolic link; name a regular file (nothing was written)")


def write_user_file(path: Path, text: str, option: str) -> None:
    """Write ``text`` to the file a command-line ``option`` names (:func:`write_text`): a symbolic
    link there is refused (:func:`refuse_link`), and a failure is one line naming the option."""
    refuse_link(path, option)
    try:
        write_text(path, text)
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write: {exc.strerror or exc}") from None
