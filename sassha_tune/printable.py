"""Text for a terminal from strings this process did not write: study and parameter names from a
storage, a plug-in's or an exception's message. Control characters (an escape sequence that
retitles the terminal or clears it, a carriage return that overwrites the line, a bidirectional
override that reorders it) are shown as escapes, never sent.

One function, :func:`printable`, used by the CLI's output, the reports' terminal lines and the
trial processes' tracebacks; report.md escapes for markdown on top of it
(:mod:`sassha_tune.report.markdown`).
"""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 and C1 controls and DEL; the zero-width, line / paragraph separator and bidirectional
# formatting characters; the byte order mark
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, newlines: bool = False) -> str:
    """``str(text)`` with every control character shown as ``\\xNN`` / ``\\uNNNN``; ``newlines``
    keeps line breaks (a traceback), else they are shown too (one line stays one line)."""
    text = str(text)
    if newlines:
        return "\n".join(_HIDDEN.sub(_shown, line) for line in text.split("\n"))
    return _HIDDEN.sub(_shown, text)
