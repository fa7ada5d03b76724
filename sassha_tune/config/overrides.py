"""``--set key.path=value``: overrides of a config's keys from the command line.

Each value is read by the config files' own YAML reader (:func:`~.yamlfile.yaml_load`: safe YAML,
``1e-3`` a float, ``[32, 32]`` a list, ``null`` nothing) and put into the config's plain data
before it is validated, so a value set here is checked exactly as the same value written in the
file, and the effective config is the one a study stores. A key whose section is written in its
short form (``device: cpu``, ``schedule: cosine``, ``study.sampler: tpe``) is expanded to its
mapping form (``{name: cpu}``) when one of its keys is set.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .yamlfile import excerpt, yaml_load

__all__ = ["Override", "apply_overrides", "parse_overrides", "overridden_source"]

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
#: the option's name in messages
OPTION = "--set"


@dataclass(frozen=True)
class Override:
    """One ``--set``: the key's path (``("task", "epochs")``), its value, and the text as written."""

    path: tuple[str, ...]
    value: Any
    given: str

    @property
    def key(self) -> str:
        return ".".join(self.path)


def _parse_one(text: Any) -> Override:
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"{OPTION} {excerpt(text)}: expected key.path=value, e.g. task.epochs=3")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not _KEY.fullmatch(key):
        raise ConfigError(f"{OPTION} {excerpt(text)}: expected a key path of names joined by dots before '=', "
                          f"e.g. task.epochs=3, got {excerpt(key)}")
    if not raw.strip():
        raise ConfigError(f"{OPTION} {excerpt(text)}: expected a value after '=' (write null for none)")
    value = yaml_load(raw, f"{OPTION} {key}")
    return Override(tuple(key.split(".")), value, text)


def parse_overrides(items: Sequence[str] | None) -> list[Override]:
    """``--set`` values as :class:`Override` s (a malformed one is a one-line :class:`ConfigError`
    naming it); the same key twice is refused (which one would win is not obvious on a long line)."""
    out: list[Override] = []
    seen: dict[str, str] = {}
    if isinstance(items, str):
        items = [items]
    for text in items or ():
        o = _parse_one(text)
        if o.key in seen:
            raise ConfigError(f"{OPTION} {excerpt(o.given)}: {o.key} is already set by {OPTION} {excerpt(seen[o.key])}")
        seen[o.key] = o.given
        out.append(o)
    return out


def apply_overrides(raw: Any, overrides: Sequence[Override]) -> Any:
    """A deep copy of the config's plain data ``raw`` with the overrides in place (not validated:
    :func:`~.validate.config_from_dict` does that). A key inside a value that is neither a mapping
    nor a section's short form (a name) is a one-line :class:`ConfigError`."""
    if not overrides:
        return raw
    if not isinstance(raw, Mapping):
        return raw  # validation says what the top level should be
    out = copy.deepcopy(dict(raw))
    for o in overrides:
        node: dict[str, Any] = out
        for i, part in enumerate(o.path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str):  # a section's short form: `device: cpu` is `device: {name: cpu}`
                child = node[part] = {"name": child}
            elif not isinstance(child, dict):
                where = ".".join(o.path[: i + 1])
                raise ConfigError(f"{OPTION} {excerpt(o.given)}: {where} is {excerpt(child)}, not a mapping, "
                                  f"so it has no key {o.path[i + 1]!r}")
            node = child
        node[o.path[-1]] = copy.deepcopy(o.value)
    return out


def overridden_source(source: str, overrides: Sequence[Override]) -> str:
    """How messages name a config with overrides: ``study.yaml with --set``."""
    return f"{source} with {OPTION}" if overrides else source
