"""YAML files: ``yaml.safe_load``, plus floats written without a dot (``1e-3``, which YAML 1.1
reads as a string) and duplicate keys refused; errors are one-line
:class:`~sassha_tune.errors.ConfigError` messages naming the file and line.

Bounded, since a config may come from anyone: a file above :data:`MAX_BYTES` is refused unread,
nesting deeper than :data:`MAX_DEPTH` and documents that aliases expand to more than
:data:`MAX_NODES` nodes (the "billion laughs") or into a cycle are refused before anything is built
from them, and an error shows at most a short :func:`excerpt` of what it read.

Configs, search spaces and ``--params`` files are read with :func:`read_yaml_file` (or
:func:`yaml_load` on text already read).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "excerpt", "read_yaml_file", "unknown_key_text", "yaml_load"]

#: the largest config, search space or params file read (1 MB; the shipped ones are a few kB)
MAX_BYTES = 1_000_000
#: the deepest nesting of mappings and lists (a config needs 4)
MAX_DEPTH = 50
#: the most nodes a document may hold once its aliases are expanded
MAX_NODES = 100_000


def excerpt(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: what an error may show of the input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_key_text(key: str, allowed: tuple[str, ...] | list[str]) -> str:
    """What an error says of a key a file may not hold: the closest valid key, or all of them."""
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(allowed)}"
    return f"unknown key ({hint})"


class _LimitError(yaml.YAMLError):
    pass


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _Loader(yaml.SafeLoader):
    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _LimitError(f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node

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


def _check_expanded_size(root: yaml.Node) -> None:
    """Refuse a node graph whose aliases expand past :data:`MAX_NODES` nodes or into a cycle
    (counted on the composed graph, where each anchor is one node, so the count itself is cheap)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else (
            list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            open_.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_NODES:
                raise _LimitError(f"expands to more than {MAX_NODES} values (aliases of aliases?)")
            continue
        if key in sizes:
            continue
        if key in open_:
            raise _LimitError(f"an alias refers to a mapping or list that contains it (line {node.start_mark.line + 1})")
        open_.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_:
                raise _LimitError(f"an alias refers to a mapping or list that contains it (line {child.start_mark.line + 1})")
            if id(child) not in sizes:
                stack.append((child, False))


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


def yaml_load(text: str, source: str, *, echo: bool = True) -> Any:
    """``yaml.safe_load`` (with ``1e-3`` read as a float); syntax errors become one-line ConfigErrors.

    ``echo=False``: a syntax error gives its line and column only, not the parser's description
    (which may quote the text): for files a config refers to, whose content is not the config's."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{source}: too large ({len(text)} characters; at most {MAX_BYTES})")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except _LimitError as exc:
        raise ConfigError(f"{source}: refused: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: refused: nested too deeply") from None
    except _DuplicateKeyError as exc:
        raise ConfigError(
            f"{source}: {exc.key}: duplicate key on line {exc.line} (first on line {exc.first_line}); "
            f"each key may appear once per mapping"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        if not echo:
            raise ConfigError(f"{source}: not valid YAML{where}") from None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem[:120]}") from None


def read_yaml_file(path: str | Path, what: str = "file", *, echo: bool = True) -> Any:
    """Read and parse a YAML file with the bounds above; every failure one line naming the file
    (``echo``: as in :func:`yaml_load`)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise ConfigError(f"{p}: not a regular {what}")
        if size > MAX_BYTES:
            raise ConfigError(f"{p}: too large for a {what} ({size} bytes; at most {MAX_BYTES})")
        with p.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{p}: too large for a {what} (more than {MAX_BYTES} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {exc.start}); a {what} is YAML text") from None
    if "\x00" in text:
        raise ConfigError(f"{p}: not a text file (it contains NUL bytes); a {what} is YAML text")
    return yaml_load(text, str(p), echo=echo)
