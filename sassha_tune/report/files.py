"""Writing report files atomically: a reader (a browser, a CI job, a second ``report``) sees the
old file or the new one, never half of one, and a full disk or a crash leaves the old file intact."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["replaced", "write_text"]


@contextlib.contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces
    ``path`` in one step (``os.replace``), otherwise it is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text, encoding="utf-8")``, atomically."""
    with replaced(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
