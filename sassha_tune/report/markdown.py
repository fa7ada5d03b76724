"""The markdown blocks both reports are made of: tables, figure entries, YAML blocks of stored
settings and the provenance section, with every password hidden and every stored string escaped.

A storage URL, and every URL-looking string inside a stored config, is shown through the study
module's :func:`~sassha_tune.study.storage.mask_url` (``postgresql://user:***@host/db``). A string
that came from a storage, a plug-in or an exception (a study or parameter name, a choice, a failure
reason) goes into report.md through :func:`md_text` (HTML-escaped, table-safe, control characters
shown), :func:`md_code` (a code span, when plain) or :func:`fenced` (a code block it cannot close); the terminal
gets :func:`sassha_tune.printable.printable`.
"""

from __future__ import annotations

import html
import platform
import re
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from tabulate import tabulate

from sassha_tune.printable import printable
from sassha_tune.provenance import git_commit, package_version
from sassha_tune.study.records import DEVICE, TrialRecord

from .rows import mask_url

__all__ = ["fenced", "figure_entry", "markdown_table", "md_code", "md_text", "provenance_section", "terminal_table",
           "yaml_block"]


def md_text(value: Any) -> str:
    """``value`` as markdown text that renders as itself: HTML-escaped (``<script>`` is text),
    control characters and line breaks shown (one line, so a table row stays one row), and the
    characters that would make a code span, a link, a table cell or an escape of what follows
    (`` ` ``, ``](``, ``|``, ``\\``) escaped."""
    text = html.escape(printable(value), quote=False)
    text = text.replace("\\", "\\\\").replace("`", "\\`").replace("|", "\\|")
    return text.replace("](", "]\\(")


def md_code(value: Any) -> str:
    """``value`` as an inline code span when it is plain text (no HTML, backtick, pipe, backslash
    or control character), else as :func:`md_text`: nothing in the file is a tag, even inside a
    span that a renderer would show literally."""
    text = str(value)
    if printable(text) != text or any(c in text for c in "`<>&|\\"):
        return md_text(text)
    return f"`{text}`"


def fenced(text: str, info: str = "") -> str:
    """``text`` as a fenced code block whose fence is longer than any backtick run in it, so
    that nothing inside can close it."""
    ticks = "`" * max(3, max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{ticks}{info}\n{text if text.endswith(chr(10)) else text + chr(10)}{ticks}\n"


def markdown_table(headers: Sequence[str], table: Sequence[Sequence[str]], **options: Any) -> str:
    """A GitHub markdown table of text cells (no number parsing), followed by a blank line. Every
    header and cell goes through :func:`md_text`: a ``|``, a line break or HTML in one cannot split
    the cell (and the row) or become markup."""
    return tabulate([[md_text(c) for c in row] for row in table], headers=[md_text(h) for h in headers],
                    tablefmt="github", disable_numparse=True, **options) + "\n"


def _width(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def terminal_table(headers: Sequence[str], table: Sequence[Sequence[str]], *, width: int | None = None,
                   drop_order: Sequence[str] = ()) -> str:
    """A plain-text table that fits ``width`` columns (default: the terminal's, 80 when unknown).

    When it is too wide, the columns named in ``drop_order`` are left out, first named first,
    until it fits, and a last line names them (every column is in the markdown report). When it
    is still too wide, the columns are split into stacked tables that each repeat the first
    column (the trial number). Control characters in a header or cell are shown, not sent.
    """
    width = width or shutil.get_terminal_size((80, 24)).columns
    headers, rows = [printable(h) for h in headers], [[printable(c) for c in r] for r in table]
    dropped: list[str] = []

    def render(cols: Sequence[int]) -> str:
        return tabulate([[r[j] for j in cols] for r in rows], headers=[headers[j] for j in cols],
                        tablefmt="simple", disable_numparse=True)

    text = render(range(len(headers)))
    for name in drop_order:
        if _width(text) <= width:
            break
        if name not in headers:
            continue
        j = headers.index(name)
        headers.pop(j)
        for r in rows:
            r.pop(j)
        dropped.append(name)
        text = render(range(len(headers)))
    if _width(text) > width and len(headers) > 2:
        blocks, cols = [], [0]
        for j in range(1, len(headers)):
            if len(cols) > 1 and _width(render([*cols, j])) > width:
                blocks.append(render(cols))
                cols = [0]
            cols.append(j)
        blocks.append(render(cols))
        text = "\n\n".join(blocks)
    if dropped:
        text += "\n" + textwrap.fill(f"(left out: {', '.join(dropped)}; all in the markdown)", width)
    return text


def figure_entry(key: str, caption: str, path: Path) -> str:
    """A figure's subsection: its key as heading, the caption and the PNG next to the markdown
    (the key and the file name are the report's own; the caption escapes what it quotes)."""
    return f"### {key}\n\n{caption}\n\n![{key}]({path.name})\n"


def _mask_secrets(value: Any) -> Any:
    """A copy of a config with the password of every URL-looking string hidden."""
    if isinstance(value, dict):
        return {k: _mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_secrets(v) for v in value]
    if isinstance(value, str) and ("://" in value or "=" in value):
        return mask_url(value)
    return value


def yaml_block(value: Any) -> str:
    """A fenced YAML block of a stored config or search space, passwords hidden."""
    return fenced(yaml.safe_dump(_mask_secrets(value), sort_keys=False, default_flow_style=False), "yaml")


def _study_commit(study: optuna.Study, rows: Sequence[TrialRecord]) -> str | None:
    """The commit the study's trials ran with, when the study or its trials recorded one."""
    config = study.user_attrs.get("config") or {}
    sources: list[Mapping[str, Any]] = [study.user_attrs, config if isinstance(config, dict) else {}]
    sources += [r.user_attrs for r in rows]
    for source in sources:
        for key in ("git_commit", "code_commit", "commit"):
            if source.get(key):
                return str(source[key])
    return None


def _provenance(study: optuna.Study, rows: Sequence[TrialRecord], storage: str | None) -> list[list[str]]:
    devices = sorted({str(r.user_attrs[DEVICE]) for r in rows if r.user_attrs.get(DEVICE)})
    lines = [
        ["sassha_tune (report)", package_version("sassha-tune")],
        ["sassha_tune (study created with)", str(study.user_attrs.get("sassha_tune_version", "unknown"))],
        ["torch", package_version("torch")],
        ["optuna", package_version("optuna")],
        ["python", platform.python_version()],
        ["device(s)", ", ".join(devices) or "unknown"],
        ["study commit", _study_commit(study, rows) or "unknown"],
        ["report generated at commit", git_commit() or "unknown"],
    ]
    if storage is not None:
        lines.append(["storage", mask_url(storage)])
    return lines


def provenance_section(study: optuna.Study | None, rows: Sequence[TrialRecord],
                       storage: str | None) -> list[str]:
    """The ``## Provenance`` section: package versions, python, the trials' devices, the study's
    commit and the report's, and the masked storage URL (empty table without a study)."""
    lines = _provenance(study, rows, storage) if study is not None else []
    return ["## Provenance\n", markdown_table(["item", "value"], lines)]
