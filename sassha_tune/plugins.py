"""Plug-ins: the one place a config can make sassha-tune run code.

A config names a plug-in as ``package.module:function`` (a model factory in ``task.model``, a
dataset factory in ``task.dataset_options.factory``). :func:`load_plugin` imports the module and
returns the function; nothing else in a config is ever imported or evaluated.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from .errors import UserError

__all__ = ["PLUGIN_SPEC", "is_plugin", "load_plugin"]

#: ``package.module:function`` (the function may be an attribute path, ``module:Class.create``)
PLUGIN_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_plugin(name: str) -> bool:
    """Whether a model or dataset name refers to a plug-in rather than a built-in."""
    return ":" in name


def load_plugin(spec: Any, what: str) -> Callable[..., Any]:
    """Import ``package.module:function`` and return the callable; every failure is a one-line
    :class:`UserError` that starts with ``what`` (e.g. ``model plug-in``) and the spec."""
    if not isinstance(spec, str) or ":" not in spec:
        raise UserError(f"{what} must be 'package.module:function', got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise UserError(f"{what} {spec!r}: cannot import {mod_name!r} ({exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(f"{what} {spec!r}: {mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise UserError(f"{what} {spec!r} is not callable")
    return obj
