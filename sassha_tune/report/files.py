"""Writing report files atomically: a reader (a browser, a CI job, a second ``report``) sees the
old file or the new one, never half of one, and a full disk or a crash leaves the old file intact.
New files get the permissions the umask allows (0644 under the usual 022), as files written with
``open`` do: a report is meant to be shared."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["replaced", "write_text"]


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
