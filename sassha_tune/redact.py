"""Secrets out of every message: storage URLs with their passwords masked, error texts scrubbed.

A database URL can carry a password in two places: its user part (``scheme://user:PASSWORD@host``)
and its query (``?password=PASSWORD``, libpq's ``sslpassword=``, a token or key a driver takes).
:func:`mask_url` replaces both with ``***``; :func:`scrub` removes a URL's secrets from any other
text (a driver's error message that quotes its connection string). Both work on text no URL parser
accepts, and on values that are not strings at all (a storage given as a list): over-masking is the
safe side.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "SECRET_KEYS", "mask_url", "scrub", "url_secrets"]

MASK = "***"

#: query parameters whose value is a secret (compared case-insensitively, ``-`` as ``_``)
SECRET_KEYS = frozenset({
    "password", "passwd", "pwd", "pass", "sslpassword", "secret", "token", "access_token", "auth_token",
    "api_key", "apikey", "key", "private_key", "sslkey_password", "credentials", "auth",
})

# ``scheme://user:password@`` (or ``user:password@``): everything up to the last ``@`` counts as
# the password, so an unparsable URL still never shows one.
_USERINFO = re.compile(r"^(?P<head>(?:[A-Za-z][\w+.\-]*://)?[^:/@?#\s]*:)(?P<password>(?!//).*)@", re.S)
# ``key=value`` in a query (``?`` or ``&`` or ``;`` before it), the value up to the next separator
_QUERY_PAIR = re.compile(r"(?P<head>(?:^|[?&;\s])(?P<key>[\w.\-%]+)=)(?P<value>[^&;#\s]*)")


def _is_secret_key(key: str) -> bool:
    from urllib.parse import unquote

    return unquote(key).lower().replace("-", "_") in SECRET_KEYS


def url_secrets(url: Any) -> list[str]:
    """The secret substrings of ``url`` (its password and the values of secret query parameters)."""
    text = str(url)
    found: list[str] = []
    m = _USERINFO.match(text)
    if m and m["password"]:
        found.append(m["password"])
    for q in _QUERY_PAIR.finditer(text):
        if _is_secret_key(q["key"]) and q["value"]:
            found.append(q["value"])
    found += _parsed_secrets(text)
    # longest first, so a secret containing another is replaced whole; the URL-decoded forms too
    from urllib.parse import unquote

    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def _parsed_secrets(text: str) -> list[str]:
    """The secrets SQLAlchemy's URL parser finds in ``text`` (none when it is no URL it parses)."""
    found: list[str] = []
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(text)
        if parsed.password:
            found.append(str(parsed.password))
        for key, value in parsed.query.items():
            if _is_secret_key(key):
                found += [v for v in ((value,) if isinstance(value, str) else value) if v]
    except Exception:
        pass
    return found


def mask_url(url: Any) -> str:
    """``url`` with its password and secret query values replaced by ``***`` (for every message,
    table, report and log). A value that is not a string is shown as text, masked the same way."""
    text = str(url) if not isinstance(url, (list, tuple, dict)) else " ".join(map(str, _flatten(url)))
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", text, count=1)
    text = _QUERY_PAIR.sub(lambda q: f"{q['head']}{MASK}" if _is_secret_key(q["key"]) and q["value"] else q[0], text)
    return text


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in [k, *_flatten(v)]]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    return [value]


def scrub(text: str, url: Any, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters, without any secret of ``url`` in it (and
    any other URL in it masked)."""
    text = str(text)
    for secret in url_secrets(url):
        text = text.replace(secret, MASK)
    text = " ".join(mask_url(word) if "://" in word or "=" in word else word for word in text.split())
    return text[:limit]
