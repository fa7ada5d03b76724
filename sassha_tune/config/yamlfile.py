"""YAML files: ``yaml.safe_load``, plus floats written without a dot (``1e-3``, which YAML 1.1
reads as a string) and duplicate keys refused; errors are one-line
:class:`~sassha_tune.errors.ConfigError` messages naming the file and line.

Configs, search spaces and ``--params`` files are read with :func:`yaml_load`.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["yaml_load"]


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # YAML requires unique keys, but PyYAML keeps the last one: two `task:` sections would
        # silently merge into one. Refuse them (merge keys `<<` may still be overridden).
        seen: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: SafeConstructor reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _DuplicateKeyError(key, line, first)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str, source: str) -> Any:
    """``yaml.safe_load`` (with ``1e-3`` read as a float); syntax errors become one-line ConfigErrors."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except _DuplicateKeyError as exc:
        raise ConfigError(
            f"{source}: {exc.key}: duplicate key on line {exc.line} (first on line {exc.first_line}); "
            f"each key may appear once per mapping"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
