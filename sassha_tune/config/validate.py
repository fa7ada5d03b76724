"""Validation: YAML -> a checked :class:`~.schema.Config`.

Everything a user can get wrong is checked here, before a storage, a study or a process is
created. Errors are :class:`~sassha_tune.errors.ConfigError` with one line of the form
``FILE: key.path: expected X, got Y``; unknown keys name the closest valid key. The search space
is part of the config and is resolved and checked here too (:mod:`.spaces`).
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import inspect
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..devices import DEVICE_CHOICES, DEVICE_NAME
from ..errors import ConfigError
from ..metrics.names import LANGUAGE_METRICS, OBJECTIVE_METRICS, PER_EPOCH_METRICS, SHARPNESS_METRICS
from ..plugins import PLUGIN_SPEC, is_plugin
from .schema import (
    AMP_MODES,
    IMPLICIT_DEFAULTS,
    KEEP_MODELS,
    PRUNERS,
    SAMPLERS,
    BudgetConfig,
    Config,
    DeviceConfig,
    MetricsConfig,
    ObjectiveSpec,
    OptimizerConfig,
    PrunerConfig,
    SamplerConfig,
    ScheduleConfig,
    StudyConfig,
    TaskConfig,
    field_defaults,
    fill_derived_defaults,
)
from .search import callback_label, make_sampler, parse_callbacks, pruner_by_name, resolve_pruner
from .yamlfile import excerpt, read_yaml_file, unknown_key_text

__all__ = ["config_from_dict", "load_config", "published_to_enqueue", "with_model_normalization",
           "SHARPNESS_BUDGET_KEYS"]

_STUDY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
#: the longest study name: Optuna's column holds 512 characters, but MariaDB's index on it (utf8mb4)
#: and the file names of reports are the tighter limits; 128 fits every storage.
MAX_NAME_LENGTH = 128
#: the largest seed: torch, numpy and the probe generators all take seeds up to 2**63 - 1
MAX_SEED = 2**63 - 1
#: the longest heartbeat interval and staleness (one day): a longer one overflows the heartbeat
#: thread's timer and leaves a crashed study waiting for days before `resume` reclaims its trials
MAX_LIVENESS_SECONDS = 86400.0


# --------------------------------------------------------------------------------------------
# Checkers: each takes (value, ctx, path) and returns the converted value or raises ConfigError.
# --------------------------------------------------------------------------------------------

_REQUIRED = object()


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, expected: str, got: Any = _REQUIRED, *, raw: str | None = None) -> ConfigError:
        if raw is not None:
            return ConfigError(f"{self.source}: {path}: {raw}")
        return ConfigError(f"{self.source}: {path}: expected {expected}, got {_show(got)}")


def _show(value: Any) -> str:
    if value is _REQUIRED:
        return "nothing (the key is required)"
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


Checker = Callable[[Any, _Ctx, str], Any]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(lo: int | None = None, hi: int | None = None) -> Checker:
    def check(v: Any, ctx: _Ctx, path: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ctx.fail(path, _range_text("an integer", lo, hi), v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ctx.fail(path, _range_text("an integer", lo, hi), v)
        return v

    return check


def _float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Checker:
    def check(v: Any, ctx: _Ctx, path: str) -> float:
        ok = _is_number(v) and math.isfinite(v)  # neither NaN nor infinite
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            raise ctx.fail(path, _range_text("a number", lo, hi, lo_open, hi_open), v)
        return float(v)

    return check


def _range_text(kind: str, lo: Any, hi: Any, lo_open: bool = False, hi_open: bool = False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return kind + (" " + " and ".join(parts) if parts else "")


def _bool(v: Any, ctx: _Ctx, path: str) -> bool:
    if not isinstance(v, bool):
        raise ctx.fail(path, "true or false", v)
    return v


def _str(v: Any, ctx: _Ctx, path: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(path, "a non-empty string", v)
    return v


def _choice_text(v: Any, options: tuple[str, ...], extra: str = "") -> str:
    hint = ""
    if isinstance(v, str):
        close = difflib.get_close_matches(v, options, n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    return f"expected one of {', '.join(options)}{' ' + extra if extra else ''}, got {_show(v)}{hint}"


def _choice(options: tuple[str, ...]) -> Checker:
    def check(v: Any, ctx: _Ctx, path: str) -> str:
        if isinstance(v, str) and v in options:
            return v
        raise ctx.fail(path, "", raw=_choice_text(v, options))

    return check


def _optional(inner: Checker) -> Checker:
    def check(v: Any, ctx: _Ctx, path: str) -> Any:
        return None if v is None else inner(v, ctx, path)

    return check


def _sizes(length: int | None = None, *, least: int = 0) -> Checker:
    """A list of integers >= 1 (widths, a shape): exactly ``length`` of them, or at least ``least``."""
    if length is not None:
        expected = f"a list of {length} integers >= 1"
    else:
        expected = "a non-empty list of integers >= 1" if least else "a list of integers >= 1"

    def check(v: Any, ctx: _Ctx, path: str) -> list[int]:
        ok = isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)
        if not ok or (len(v) != length if length is not None else len(v) < least):
            raise ctx.fail(path, expected, v)
        return v

    return check


def _strings(v: Any, ctx: _Ctx, path: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise ctx.fail(path, "a list of non-empty strings", v)
    return v


def _scalar_value(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(_scalar_value(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _scalar_value(x) for k, x in v.items())
    return False


def _mapping(v: Any, ctx: _Ctx, path: str) -> dict[str, Any]:
    """A free-form mapping of options (string keys, plain YAML values)."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ctx.fail(path, "a mapping", v)
    for k, x in v.items():
        if not isinstance(k, str):
            raise ctx.fail(f"{path}.{k}", "a string key", k)
        if not _scalar_value(x):
            raise ctx.fail(f"{path}.{k}", "a plain YAML value", x)
    return dict(v)


def _fractions(v: Any, ctx: _Ctx, path: str) -> list[float]:
    if not isinstance(v, list) or not all(_is_number(x) and 0 < x < 1 for x in v):
        raise ctx.fail(path, "a list of fractions of training, each between 0 and 1", v)
    if list(v) != sorted(v):
        raise ctx.fail(path, "increasing fractions", v)
    return [float(x) for x in v]


def _device_name(v: Any, ctx: _Ctx, path: str) -> str:
    if not isinstance(v, str) or not DEVICE_NAME.match(v):
        raise ctx.fail(path, DEVICE_CHOICES, v)
    return v


def _study_name(v: Any, ctx: _Ctx, path: str) -> str:
    # fullmatch: ``$`` would accept a trailing newline (a study ``mal\n`` nobody can name again)
    if not isinstance(v, str) or not _STUDY_NAME_RE.fullmatch(v) or len(v) > MAX_NAME_LENGTH:
        raise ctx.fail(path, f"a study name of letters, digits, '_', '-', '.' (at most {MAX_NAME_LENGTH})", v)
    return v


def _storage(v: Any, ctx: _Ctx, path: str) -> str:
    """A storage URL: a printable string. Never echoed unmasked (it may carry a password)."""
    from ..redact import mask_url

    if not isinstance(v, str) or not v.strip():
        shown = type(v).__name__ if not isinstance(v, str) else "an empty string"
        raise ctx.fail(path, "", raw=f"expected a database URL string, got {shown}")
    if not v.isprintable():
        raise ctx.fail(path, "", raw=f"expected a database URL without control characters, got {mask_url(v)!r}")
    return v


def _plugin_or_name(v: Any, ctx: _Ctx, path: str) -> str:
    """A registered name, or a ``package.module:function`` plug-in (imported only when used)."""
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(path, "a name or a package.module:function plug-in", v)
    if is_plugin(v) and not PLUGIN_SPEC.match(v):
        raise ctx.fail(path, "a package.module:function plug-in", v)
    return v


def _plugin(v: Any, ctx: _Ctx, path: str) -> str:
    if not isinstance(v, str) or not PLUGIN_SPEC.match(v):
        raise ctx.fail(path, "a package.module:function plug-in", v)
    return v


def _search_space_ref(v: Any, ctx: _Ctx, path: str) -> str | dict[str, Any] | None:
    if v is None or (isinstance(v, str) and v.strip()):
        return v
    if isinstance(v, dict):
        return _mapping(v, ctx, path)
    raise ctx.fail(path, "a search-space name, a path to a YAML file, or an inline mapping", v)


def _enqueue_published(v: Any, ctx: _Ctx, path: str) -> bool | str | list[str]:
    """``auto`` (the space's ``prior:``), true/false, or a non-empty list of distinct ``source``
    strings (checked against the space later)."""
    if isinstance(v, bool) or v == "auto":
        return v
    if isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v):
        if len(set(v)) != len(v):
            raise ctx.fail(path, "distinct sources", v)
        return list(v)
    raise ctx.fail(path, "auto, true, false or a list of published `source` strings", v)


def _lambda_method(v: Any, ctx: _Ctx, path: str) -> str | None:
    if v is None or v in ("lanczos", "power"):
        return v
    raise ctx.fail(path, "", raw=_choice_text(v, ("lanczos", "power"), "or null (skip lambda_max)"))


# metrics.budget: the keyword arguments of sharpness.hessian_metrics (tests compare the names with
# its signature), each with the checker of its value.
_BUDGET_CHECKERS: dict[str, Checker] = {
    "chunk_size": _optional(_int(1)),
    "lambda_method": _lambda_method,
    "lambda_tol": _float(0, lo_open=True),
    "lambda_max_iters": _int(0),
    "trace_probes": _int(0),
    "trace_batch_size": _optional(_int(1)),
    "sam_rho": _optional(_float(0)),
    "sam_steps": _int(0),
    "adaptive_rho": _optional(_float(0)),
    "ascent_step": _float(0, 1, lo_open=True),
    "average_sigma": _optional(_float(0, lo_open=True)),
    "average_samples": _int(1),
    "average_adaptive": _bool,
}
SHARPNESS_BUDGET_KEYS = tuple(_BUDGET_CHECKERS)


def _sharpness_budget(v: Any, ctx: _Ctx, path: str) -> dict[str, Any]:
    d = _mapping(v, ctx, path)
    _check_keys(d, list(SHARPNESS_BUDGET_KEYS), ctx, f"{path}.")
    return {key: _BUDGET_CHECKERS[key](value, ctx, f"{path}.{key}") for key, value in d.items()}


def _options(v: Any, names: tuple[str, ...] | None, ctx: _Ctx, path: str, what: str) -> None:
    """Refuse option keys a built-in dataset/model does not take (``names`` None: a plug-in)."""
    if names is None:
        return
    for key in v:
        if key not in names:
            close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else (
                f"{what} takes {', '.join(names)}" if names else f"{what} takes no options"
            )
            raise ctx.fail(f"{path}.{key}", "", raw=f"unknown option ({hint})")


def _option_values(options: Mapping[str, Any], checkers: Mapping[str, Checker], ctx: _Ctx, path: str) -> None:
    """Check each option that has a checker (names were checked by :func:`_options`). The values
    are kept as written: the config is stored as given and compared on resume."""
    for key, value in options.items():
        if key in checkers:
            checkers[key](value, ctx, f"{path}.{key}")


def _model_option_checker(param: inspect.Parameter) -> Checker:
    """The checker of a built-in model's option, from its constructor parameter: the annotation
    gives the type; an integer is a size or a count (>= 1); a float a dropout probability
    (``dropout``: 0 <= p < 1) or else a positive factor; ``tuple[int, int]`` that many sizes;
    ``Sequence[int]`` any number of them."""
    kind, origin, args = param.annotation, typing.get_origin(param.annotation), typing.get_args(param.annotation)
    if kind is bool:
        return _bool
    if kind is int:
        return _int(1)
    if kind is float:
        return _float(0, 1, hi_open=True) if param.name == "dropout" else _float(0, lo_open=True)
    if origin is tuple and args and all(a is int for a in args):
        return _sizes(len(args))
    if origin in (list, Sequence) and args == (int,):
        return _sizes()
    raise TypeError(f"model option {param.name!r}: the config has no check for its annotation {kind!r}")


def _model_option_checkers(model: str) -> dict[str, Checker]:
    """Built-in model ``model``'s option checkers, read from its constructor (none for a plug-in)."""
    from ..training.models import model_option_parameters

    return {p.name: _model_option_checker(p) for p in model_option_parameters(model) or ()}


def _mnist1d_args(v: Any, ctx: _Ctx, path: str) -> dict[str, Any]:
    """``mnist1d``'s ``args``: overrides of ``mnist1d.data.get_dataset_args()``, whose names and
    value kinds they must have (when mnist1d is installed; loading the dataset says when it is not)."""
    d = _mapping(v, ctx, path)
    try:
        from mnist1d.data import get_dataset_args
    except ImportError:
        return d
    defaults = vars(get_dataset_args())
    _check_keys(d, list(defaults), ctx, f"{path}.")
    for key, value in d.items():
        if (error := _value_kind_error(key, value, defaults[key])) is not None:
            raise ctx.fail(f"{path}.{key}", "", raw=error)
    return d


def _dataset_option_checkers(dataset: str) -> dict[str, Checker]:
    """The checkers of ``task.dataset_options`` for built-in dataset ``dataset`` (a test checks that
    every name ``training.data.dataset_option_names`` lists has one). ``max_train``, ``max_test`` and ``normalize``
    are what ``load_dataset`` does with any dataset's options, the ``custom`` plug-in's included;
    a plug-in's other options go to its factory unchecked."""
    from ..training.data import AUGMENTATIONS

    common: dict[str, Checker] = {"max_train": _int(1), "max_test": _int(1), "normalize": _bool}
    seed = _int(0, MAX_SEED)
    checkers: dict[str, dict[str, Checker]] = {
        "mnist1d": {**common, "args": _mnist1d_args},
        "digits": {**common, "test_fraction": _float(0, 1, lo_open=True, hi_open=True), "data_seed": seed},
        "fashion_mnist": common,
        "cifar10": common,
        "cifar100": {**common, "labels": _choice(("fine", "coarse"))},
        "synthetic": {**common, "n": _int(1), "n_test": _int(1), "dim": _int(1), "shape": _sizes(least=1),
                      "classes": _int(2), "hidden": _int(1), "data_seed": seed,
                      "augment": _optional(_choice(AUGMENTATIONS))},
        "custom": common,
        "text": {"block_size": _int(1), "pattern": _str, "exclude": _strings, "max_tokens": _optional(_int(1)),
                 "test_fraction": _float(0, 1, hi_open=True)},
    }
    return checkers.get(dataset, {})


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _check_keys(d: Mapping[str, Any], allowed: list[str], ctx: _Ctx, path: str) -> None:
    for key in d:
        if not isinstance(key, str):
            raise ctx.fail(f"{path}{key}", "", raw=f"keys must be strings, got {_show(key)}")
        if key not in allowed:
            raise ctx.fail(f"{path}{key}", "", raw=unknown_key_text(key, allowed))


def _section(
    raw: Any, fields: dict[str, tuple[Checker, Any]], ctx: _Ctx, path: str
) -> dict[str, Any]:
    """Check a mapping against ``{key: (checker, default)}``; return converted values."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ctx.fail(path, "a mapping", raw)
    _check_keys(raw, list(fields), ctx, f"{path}." if path else "")
    out: dict[str, Any] = {}
    for key, (checker, default) in fields.items():
        sub = f"{path}.{key}" if path else key
        if key in raw:
            out[key] = checker(raw[key], ctx, sub)
        elif default is _REQUIRED:
            raise ctx.fail(sub, "a value", _REQUIRED)
        else:
            out[key] = copy.deepcopy(default)
    return out


def _named_section(raw: Any, fields: dict[str, tuple[Checker, Any]], ctx: _Ctx, path: str) -> dict[str, Any]:
    """:func:`_section` of a section that may be written as its name alone (``sampler: tpe``)."""
    return _section({"name": raw} if isinstance(raw, str) else raw, fields, ctx, path)


def _fields(cls: type, checkers: Mapping[str, Checker], **defaults: Any) -> dict[str, tuple[Checker, Any]]:
    """:func:`_section`'s fields for the keys of dataclass ``cls``: each default is the schema's
    (:func:`~.schema.field_defaults`) unless ``defaults`` gives it; a key with neither is required."""
    defaults = {**field_defaults(cls), **defaults}
    return {key: (checker, defaults.get(key, _REQUIRED)) for key, checker in checkers.items()}


def _default_direction(metric: str) -> str:
    return "maximize" if metric.endswith("_acc") else "minimize"


def _objective(v: Any, ctx: _Ctx, path: str) -> ObjectiveSpec:
    if isinstance(v, str):
        parts = v.split()
        metric = _choice(OBJECTIVE_METRICS)(parts[0] if parts else v, ctx, path)
        if len(parts) == 1:
            return ObjectiveSpec(metric, _default_direction(metric))
        if len(parts) == 2:
            return ObjectiveSpec(metric, _choice(("maximize", "minimize"))(parts[1], ctx, path))
        raise ctx.fail(path, "'METRIC' or 'METRIC maximize|minimize'", v)
    if isinstance(v, dict):
        d = _section(
            v,
            {"metric": (_choice(OBJECTIVE_METRICS), _REQUIRED), "direction": (_optional(_choice(("maximize", "minimize"))), None)},
            ctx,
            path,
        )
        return ObjectiveSpec(d["metric"], d["direction"] or _default_direction(d["metric"]))
    raise ctx.fail(path, "a metric name or a mapping {metric, direction}", v)


def _as_written(v: Any, ctx: _Ctx, path: str) -> Any:
    """A value parsed after its section (with the keys it goes with, or as a section of its own)."""
    return v


def _parse_study(raw: Any, ctx: _Ctx, default_name: str) -> StudyConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ctx.fail("study", "a mapping", raw)
    checkers: dict[str, Checker] = {
        "name": _study_name,
        "storage": _optional(_storage),
        "objective": _as_written,
        "direction": _optional(_choice(("maximize", "minimize"))),
        "objectives": _as_written,
        "sampler": _as_written,
        "pruner": _as_written,
        "heartbeat_interval": _float(0.01, MAX_LIVENESS_SECONDS),
        "stale_after": _float(0, MAX_LIVENESS_SECONDS, lo_open=True),
        "callbacks": _as_written,
        "chance_guard": _chance_guard,
        "fresh_process": _bool,
        "diverged_as_pruned": _bool,
        "warm_start": _warm_start,
        "keep_models": _choice(KEEP_MODELS),
        "artifact_dir": _optional(_str),
    }
    # the keys parsed after the section are None when not written
    unwritten = dict.fromkeys(("objective", "direction", "objectives", "sampler", "pruner", "callbacks"))
    d = _section(raw, _fields(StudyConfig, checkers, name=default_name, **unwritten,
                              diverged_as_pruned=IMPLICIT_DEFAULTS["study.diverged_as_pruned"]), ctx, "study")
    objectives = _objectives(d, ctx)
    s = _named_section(d["sampler"], _fields(SamplerConfig, {
        "name": _choice(SAMPLERS), "seed": _optional(_int(0, MAX_SEED)), "options": _mapping,
    }, name=IMPLICIT_DEFAULTS["study.sampler"]), ctx, "study.sampler")
    p = _named_section(d["pruner"], _fields(PrunerConfig, {"name": _choice(PRUNERS), "options": _mapping},
                                            name=IMPLICIT_DEFAULTS["study.pruner"]), ctx, "study.pruner")
    if d["warm_start"] is not None and d["warm_start"]["study"] == d["name"]:
        raise ctx.fail("study.warm_start", "", raw=f"names this study ({d['name']!r}); name an earlier one")
    if d["stale_after"] <= d["heartbeat_interval"]:
        raise ctx.fail("study.stale_after", f"a number > study.heartbeat_interval ({d['heartbeat_interval']})", d["stale_after"])
    return StudyConfig(
        name=d["name"],
        storage=d["storage"],
        objectives=objectives,
        sampler=SamplerConfig(**s),
        pruner=PrunerConfig(**p),
        heartbeat_interval=d["heartbeat_interval"],
        stale_after=d["stale_after"],
        chance_guard=d["chance_guard"],
        callbacks=_callbacks(d["callbacks"], ctx),
        fresh_process=d["fresh_process"],
        diverged_as_pruned=d["diverged_as_pruned"],
        warm_start=d["warm_start"],
        keep_models=d["keep_models"],
        artifact_dir=d["artifact_dir"],
    )


def _objectives(d: dict[str, Any], ctx: _Ctx) -> list[ObjectiveSpec]:
    """``study.objective`` (with ``study.direction``) or ``study.objectives``, from the study section ``d``."""
    if d["objective"] is not None and d["objectives"] is not None:
        raise ctx.fail("study.objectives", "", raw="give either study.objective or study.objectives, not both")
    if d["objectives"] is None:
        metric = d["objective"] if d["objective"] is not None else field_defaults(StudyConfig)["objectives"][0].metric
        if not isinstance(metric, str):
            raise ctx.fail("study.objective", "a metric name", metric)
        objective = _objective(metric, ctx, "study.objective")
        if d["direction"] is not None:
            objective.direction = d["direction"]
        return [objective]
    if d["direction"] is not None:
        raise ctx.fail("study.direction", "", raw="goes with study.objective; put each direction in study.objectives")
    items = d["objectives"]
    if not isinstance(items, list) or not 1 <= len(items) <= 3:
        raise ctx.fail("study.objectives", "a list of 1 to 3 objectives", items)
    objectives = [_objective(v, ctx, f"study.objectives[{i}]") for i, v in enumerate(items)]
    if len({o.metric for o in objectives}) != len(objectives):
        raise ctx.fail("study.objectives", "distinct metrics", [o.metric for o in objectives])
    return objectives


def _warm_start(v: Any, ctx: _Ctx, path: str) -> dict[str, Any] | None:
    """``NAME`` or ``{study: NAME, top: K}``: the earlier study (same storage) whose best K complete
    configurations (default 3) a new study runs first."""
    if v is None:
        return None
    if isinstance(v, str):
        v = {"study": v}
    d = _section(v, {"study": (_study_name, _REQUIRED), "top": (_int(1, 100), 3)}, ctx, path)
    return {"study": d["study"], "top": d["top"]}


def _chance_guard(v: Any, ctx: _Ctx, path: str) -> int | str:
    """``auto``, or an epoch count (0: off); checked against ``task.epochs`` in the cross checks."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return v
    raise ctx.fail(path, "'auto', 0 (off) or the epoch after which a trial still near chance stops", v)


def _callbacks(raw: Any, ctx: _Ctx) -> list[dict[str, Any]]:
    entries = parse_callbacks(raw, ctx.fail)
    for i, entry in enumerate(entries):
        if PLUGIN_SPEC.match(entry["name"]):
            _import_plugin(entry["name"], ctx, f"{callback_label(i)}.name")
    return entries


def _builtin_task(raw_task: Any, ctx: _Ctx, base_dir: str | Path) -> dict[str, Any]:
    """``task`` for the built-in trainer: a dataset, a model and how to train them."""
    t = _section(
        raw_task,
        _fields(TaskConfig, {
            "dataset": _plugin_or_name,
            "model": _plugin_or_name,
            "data_dir": _optional(_str),
            "dataset_options": _mapping,
            "model_options": _mapping,
            "epochs": _int(1),
            "batch_size": _int(1),
            "eval_batch_size": _optional(_int(1)),
            "augment": _optional(_bool),
            "label_noise": _float(0, 1, hi_open=True),
            "val_fraction": _float(0, 1, lo_open=True, hi_open=True),
            "max_steps_per_epoch": _optional(_int(1)),
            "grad_accumulation": _int(1),
        }),
        ctx,
        "task",
    )
    if t["grad_accumulation"] > t["batch_size"]:
        raise ctx.fail("task.grad_accumulation", f"an integer <= task.batch_size ({t['batch_size']}): "
                       "each micro-batch takes a slice of a step's batch", t["grad_accumulation"])
    if t["data_dir"] is not None and not Path(t["data_dir"]).expanduser().is_absolute():
        t["data_dir"] = str((Path(base_dir) / Path(t["data_dir"]).expanduser()).resolve())
    return t


# with your own training function the built-in trainer's keys have no meaning
_USER_TRAIN_KEYS = ["train", "train_options", "epochs"]


def _user_train_task(raw: dict[str, Any], study: StudyConfig, ctx: _Ctx) -> dict[str, Any]:
    """``task`` with ``train: package.module:function``: the function brings its own data and model,
    and does itself what the built-in trainer's settings elsewhere in ``raw`` would do."""
    for key in raw["task"]:
        if isinstance(key, str) and key not in _USER_TRAIN_KEYS:
            raise ctx.fail(f"task.{key}", "", raw=f"is not used with task.train (your function trains its own "
                           f"data and model); a task.train task takes {', '.join(_USER_TRAIN_KEYS)}")
    t = _section(raw["task"], _fields(TaskConfig, {"train": _plugin, "train_options": _mapping, "epochs": _int(1)},
                                      train=_REQUIRED), ctx, "task")
    if study.keep_models != "none":
        raise ctx.fail("study.keep_models", "", raw="keeps the models of the built-in trainer; your task.train "
                       "function has its model: save it there (none with task.train)")
    if "schedule" in raw:
        raise ctx.fail("schedule", "", raw="is not used with task.train (your function sets its own learning rates)")
    if isinstance(raw["optimizer"], dict) and "grad_clip" in raw["optimizer"]:
        raise ctx.fail("optimizer.grad_clip", "", raw="is not used with task.train (clip in your function)")
    return {**t, "dataset": "", "model": ""}


_TOP_KEYS = ["study", "budget", "task", "optimizer", "schedule", "metrics", "device", "seed", "provenance"]
#: the study's name when the config's file name cannot be one
_FALLBACK_NAME = "sassha-tune"


def _default_name(name_from: str) -> str:
    """The study's name when the config gives none: its file's name (``name_from``), if that is a study name."""
    name = Path(name_from).stem if name_from and not name_from.startswith("<") else _FALLBACK_NAME
    return name if _STUDY_NAME_RE.fullmatch(name) and len(name) <= MAX_NAME_LENGTH else _FALLBACK_NAME


def config_from_dict(raw: Any, source: str = "<config>", base_dir: str | Path = ".", *,
                     name_from: str | None = None) -> Config:
    """Validate a plain dict (the parsed YAML) into a :class:`Config`. ``name_from``: the file whose
    name is the study's default name, when ``source`` (what messages say) is not a file's path."""
    ctx = _Ctx(source)
    if not isinstance(raw, dict):
        raise ctx.fail("(top level)", "a mapping with sections study, task, optimizer, ...", raw)
    _check_keys(raw, _TOP_KEYS, ctx, "")
    for required in ("task", "optimizer"):
        if required not in raw:
            raise ctx.fail(required, "a section", _REQUIRED)
    study = _parse_study(raw.get("study"), ctx, _default_name(source if name_from is None else name_from))
    budget = _section(raw.get("budget"), _fields(BudgetConfig, {
        "n_trials": _int(1),
        "timeout": _optional(_float(0, lo_open=True)),
        "trial_timeout": _optional(_float(0, MAX_LIVENESS_SECONDS * 30, lo_open=True)),
    }), ctx, "budget")
    if study.artifact_dir is not None:  # relative: to the config file; stored as the absolute folder
        study.artifact_dir = str((Path(base_dir) / study.artifact_dir).resolve())
    if isinstance(raw["task"], dict) and "train" in raw["task"]:
        task = _user_train_task(raw, study, ctx)
    else:
        task = _builtin_task(raw["task"], ctx, base_dir)
    optimizer = _optimizer_section(raw["optimizer"], ctx)
    schedule = _schedule_section(raw.get("schedule"), ctx)
    metrics = _section(raw.get("metrics"), _fields(MetricsConfig, {
        "sharpness": _bool, "subset_size": _int(1), "seed": _int(0, MAX_SEED), "budget": _sharpness_budget,
        "track_every": _int(0),
    }), ctx, "metrics")
    device = _named_section(raw.get("device"), _fields(DeviceConfig, {
        "name": _device_name, "amp": _choice(AMP_MODES), "channels_last": _bool, "processes": _int(1, 1024),
    }), ctx, "device")
    cfg = Config(
        study=study,
        task=TaskConfig(**task),
        optimizer=OptimizerConfig(**optimizer),
        budget=BudgetConfig(**budget),
        schedule=ScheduleConfig(**schedule),
        metrics=MetricsConfig(**metrics),
        device=DeviceConfig(**device),
        seed=_int(0, MAX_SEED)(raw.get("seed", field_defaults(Config)["seed"]), ctx, "seed"),
        provenance=_mapping(raw.get("provenance"), ctx, "provenance"),
        source=source,
        base_dir=str(base_dir),
        name_given=isinstance(raw.get("study"), dict) and "name" in raw["study"],
        implicit=_implicit(raw),
    )
    _cross_checks(cfg, ctx)
    return cfg


def _optimizer_section(raw: Any, ctx: _Ctx) -> dict[str, Any]:
    from ..optim.registry import OPTIMIZER_NAMES  # the registry is the one list of optimizers

    checkers = {"name": _choice(OPTIMIZER_NAMES), "search_space": _search_space_ref, "fixed": _mapping,
                "enqueue_published": _enqueue_published, "grad_clip": _float(0)}
    implicit = {key: IMPLICIT_DEFAULTS[f"optimizer.{key}"] for key in ("search_space", "enqueue_published")}
    return _section(raw, _fields(OptimizerConfig, checkers, **implicit), ctx, "optimizer")


def _schedule_section(raw: Any, ctx: _Ctx) -> dict[str, Any]:
    from ..training.trainer import SCHEDULES  # the trainer's list is the one list of schedules

    sc = _named_section(raw, _fields(ScheduleConfig, {
        "name": _choice(SCHEDULES),
        "milestones": _fractions,
        "gamma": _float(0, 1, lo_open=True),
        "warmup_fraction": _float(0, 1, hi_open=True),
        "min_lr_fraction": _float(0, 1),
    }), ctx, "schedule")
    if sc["min_lr_fraction"] and sc["name"] != "cosine":
        raise ctx.fail("schedule.min_lr_fraction", "", raw=f"only the cosine schedule decays to a floor, not {sc['name']!r}")
    return sc


def _implicit(raw: dict[str, Any]) -> frozenset[str]:
    """The settings of :data:`~.schema.IMPLICIT_KEYS` the config does not write (a sampler or pruner
    whose ``name`` is not written counts as not written): a study created before keeps its own."""
    def written(section: str, key: str, inner: str | None = None) -> bool:
        d = raw.get(section)
        if not isinstance(d, dict) or key not in d:
            return False
        value = d[key]
        if inner is None:
            return value is not None
        return isinstance(value, str) or (isinstance(value, dict) and inner in value)

    given = {
        "study.sampler": written("study", "sampler", "name"),
        "study.pruner": written("study", "pruner", "name"),
        "study.diverged_as_pruned": written("study", "diverged_as_pruned"),
        "optimizer.enqueue_published": written("optimizer", "enqueue_published"),
        "optimizer.search_space": written("optimizer", "search_space"),
    }
    return frozenset(k for k, v in given.items() if not v)


def _cross_checks(cfg: Config, ctx: _Ctx) -> None:
    _objective_checks(cfg, ctx)
    _epoch_checks(cfg, ctx)
    _search_checks(cfg, ctx)
    if cfg.task.train is not None:
        _import_plugin(cfg.task.train, ctx, "task.train")
        if cfg.device.processes > 1:
            raise ctx.fail("device.processes", "", raw="must be 1 with task.train (your function runs in one process)")
    else:
        _builtin_task_checks(cfg, ctx)
        from ..training.models import has_normalization

        cfg.model_normalized = has_normalization(cfg.task.model)  # a plug-in's: once built (preflight)
    fill_derived_defaults(cfg)
    # The search space is part of the config: resolve and validate it now, then the checks that need it.
    from .spaces import space_for_config

    _space_checks(cfg, space_for_config(cfg), ctx)


def _objective_checks(cfg: Config, ctx: _Ctx) -> None:
    """The study's objectives against the metrics, the task and the pruner."""
    metrics = cfg.study.metrics
    if not cfg.metrics.sharpness:
        for name in metrics:
            if name in SHARPNESS_METRICS:
                raise ctx.fail("metrics.sharpness", "", raw=f"is false but study objective {name!r} needs it")
    language = cfg.task.dataset == "text"
    for name in metrics:
        if name in LANGUAGE_METRICS and not language and cfg.task.train is None:
            raise ctx.fail("study.objective", "", raw=f"{name!r} needs a language-model task (task.dataset: text)")
    if cfg.study.pruner.name not in ("none", "auto"):  # auto prunes only where it can (cfg.can_prune)
        if len(metrics) > 1:
            raise ctx.fail(
                "study.pruner",
                "",
                raw="Optuna cannot prune multi-objective studies (trial.report raises); use pruner: none",
            )
        if metrics[0] not in PER_EPOCH_METRICS:
            raise ctx.fail(
                "study.pruner",
                "",
                raw=f"pruning needs a per-epoch objective ({', '.join(PER_EPOCH_METRICS)}), not {metrics[0]!r}",
            )


def _epoch_checks(cfg: Config, ctx: _Ctx) -> None:
    """The settings that name an epoch (``metrics.track_every``, ``study.chance_guard``) against
    ``task.epochs`` and the trainer."""
    every = cfg.metrics.track_every
    if every > 0:
        if cfg.task.train is not None:
            raise ctx.fail("metrics.track_every", "", raw="works with the built-in trainer only (task.train trains "
                           "its own model); use 0 or leave it out")
        if every > cfg.task.epochs:
            raise ctx.fail("metrics.track_every", f"0 (off) or a number of epochs 1..{cfg.task.epochs} "
                           f"(task.epochs is {cfg.task.epochs})", every)
    guard = cfg.study.chance_guard
    if isinstance(guard, int) and guard > 0:
        if cfg.task.train is not None:
            raise ctx.fail("study.chance_guard", "", raw="works with the built-in trainer only (task.train reports "
                           "no number of classes); use 0 or leave it out")
        if guard >= cfg.task.epochs:
            raise ctx.fail("study.chance_guard", f"'auto', 0 (off) or an epoch before the last "
                           f"(1..{cfg.task.epochs - 1}; task.epochs is {cfg.task.epochs})", guard)


def _search_checks(cfg: Config, ctx: _Ctx) -> None:
    """The sampler's packages, and the sampler's and pruner's options asked of their constructors."""
    if cfg.study.sampler.name == "gp" and importlib.util.find_spec("scipy") is None:
        raise ctx.fail("study.sampler.name", "", raw="'gp' needs scipy (pip install scipy); use tpe or random")
    if cfg.study.sampler.name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise ctx.fail("study.sampler.name", "", raw="'cmaes' needs the cmaes package (pip install cmaes)")
    # Build sampler and pruner once: wrong options fail here, before anything is created.
    sampler, pruner = cfg.study.sampler, cfg.study.pruner
    _constructor_options(lambda options: make_sampler(sampler.name, options, 0, qmc_seed=cfg.sampler_seed),
                         sampler.options, ctx, "study.sampler.options", f"sampler {sampler.name!r}")
    # auto's options are those of the pruner it chooses for this study
    chosen, _ = resolve_pruner(pruner.name, {}, epochs=cfg.task.epochs, can_prune=cfg.can_prune)
    _constructor_options(lambda options: pruner_by_name(chosen, options, max_resource=cfg.task.epochs),
                         pruner.options, ctx, "study.pruner.options", f"pruner {chosen!r}")


#: annotation heads a config value may match (YAML's kinds, and the unions that may hold them)
_YAML_KINDS = ("bool", "int", "float", "str", "list", "tuple", "dict", "Sequence", "Mapping", "Any",
               "Optional", "Union", "Literal")


def _union_heads(text: str) -> set[str]:
    """The top-level names of an annotation written as text: ``Callable[[int], int] | None`` ->
    ``{"Callable", "None"}`` (``|`` inside brackets does not split)."""
    heads, depth, start = set(), 0, 0
    for i, char in enumerate(text + "|"):
        depth += (char == "[") - (char == "]")
        if char == "|" and depth == 0:
            heads.add(text[start:i].split("[")[0].strip().rsplit(".", 1)[-1])
            start = i + 1
    return heads


def _annotation_error(annotation: Any, value: Any) -> str | None:
    """Why ``value`` cannot be an argument annotated ``annotation`` (a class, or text under postponed
    evaluation: ``bool | None``); None when it can or the annotation does not say. ``bool``,
    ``int``/``float`` alone (or with None) ask for that kind; heads none of which YAML can give
    (``Callable[...]``, ``BaseSampler``) ask for a Python object."""
    if value is None or not isinstance(annotation, (str, type)):
        return None
    heads = _union_heads(annotation if isinstance(annotation, str) else annotation.__name__) - {"None"}
    if heads == {"bool"}:
        return None if isinstance(value, bool) else f"expected true or false, got {_show(value)}"
    if heads and heads <= {"int", "float"}:
        return None if _is_number(value) else f"expected a number, got {_show(value)}"
    if heads and not heads & set(_YAML_KINDS):
        return f"expected a Python object ({' or '.join(sorted(heads))}), which a config cannot give, got {_show(value)}"
    return None


def _constructor_options(
    build: Callable[[dict[str, Any]], Any], options: dict[str, Any], ctx: _Ctx, path: str, what: str
) -> None:
    """Ask a sampler's or pruner's constructor about ``options``, as ``optimizer.fixed`` is asked of
    the optimizer: names and value kinds from its signature, then each option alone (an error names
    its key), then all of them together (an error names the mapping). Optuna checks few values
    when it builds one: a string where it counts trials would fail every ask of the study."""
    def refused(opts: dict[str, Any]) -> str | None:
        try:
            build(opts)
        except (TypeError, ValueError) as exc:
            return " ".join(str(exc).split())[:200] or type(exc).__name__
        return None

    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = {p.name: p for p in inspect.signature(type(build({})).__init__).parameters.values()
              if p.kind in kinds and p.name != "self"}
    _options(options, tuple(params), ctx, path, what)
    for key, value in options.items():
        p = params[key]
        error = None if p.default is p.empty else _value_kind_error(key, value, p.default)
        if error is None:
            error = _annotation_error(p.annotation, value)
        if error is None and (why := refused({key: value})) is not None:
            error = f"{excerpt(value)} is rejected by the {what}: {why}"
        if error is not None:
            raise ctx.fail(f"{path}.{key}", "", raw=error)
    if (why := refused(options)) is not None:
        raise ctx.fail(path, "", raw=f"rejected by the {what}: {why}")


def _builtin_task_checks(cfg: Config, ctx: _Ctx) -> None:
    """The dataset, model and trainer keys of a built-in task, against each other and the device."""
    _dataset_and_model(cfg, ctx)
    _task_options(cfg, ctx)
    if cfg.task.dataset == "custom":
        factory = cfg.task.dataset_options.get("factory")
        if not isinstance(factory, str) or not PLUGIN_SPEC.match(factory):
            raise ctx.fail("task.dataset_options.factory", "a package.module:function plug-in (dataset custom needs one)",
                           _REQUIRED if factory is None else factory)
        _import_plugin(factory, ctx, "task.dataset_options.factory")
    if is_plugin(cfg.task.model):
        _import_plugin(cfg.task.model, ctx, "task.model")
    if cfg.device.processes > 1:
        if cfg.device.name.startswith("cuda:"):
            raise ctx.fail("device.processes", "", raw=f"{cfg.device.processes} needs device cuda or auto (rank r uses cuda:r), not {cfg.device.name!r}")
        if cfg.task.batch_size < cfg.device.processes:
            raise ctx.fail("device.processes", "", raw=f"{cfg.device.processes} is more than task.batch_size {cfg.task.batch_size} (each rank takes a slice of every batch)")


def _dataset_and_model(cfg: Config, ctx: _Ctx) -> None:
    """``task.dataset`` and ``task.model`` known (or plug-ins), and made for each other."""
    from ..training.data import DATASETS
    from ..training.models import MODELS, is_builtin_model, is_language_model, model_name_error

    task = cfg.task
    if not is_plugin(task.dataset) and task.dataset not in DATASETS:
        _choice(tuple(DATASETS))(task.dataset, ctx, "task.dataset")
    if not is_plugin(task.model) and not is_builtin_model(task.model):
        raise ctx.fail("task.model", "", raw=_choice_text(task.model, tuple(MODELS), "or a package.module:factory plug-in"))
    if error := model_name_error(task.model):
        raise ctx.fail("task.model", "", raw=f"{task.model!r}: {error}")
    text = task.dataset == "text"
    if not is_plugin(task.model) and is_language_model(task.model) != text:
        if text:
            raise ctx.fail("task.model", "", raw=f"dataset 'text' needs a language model (gpt or a plug-in), not {task.model!r}")
        raise ctx.fail("task.model", "", raw=f"{task.model!r} is a language model: it needs task.dataset: text")
    if text and task.label_noise:
        raise ctx.fail("task.label_noise", "", raw="dataset 'text' takes no label noise (its targets are the next tokens)")
    if text and task.augment:
        raise ctx.fail("task.augment", "", raw="dataset 'text' has no augmentation (its batches are windows at random offsets)")


def _task_options(cfg: Config, ctx: _Ctx) -> None:
    """``task.dataset_options`` and ``task.model_options``: names and values. Options of built-in
    datasets and models are known (data.py / models.py list them); a plug-in's options go to user
    code, which the config never imports."""
    from ..training.data import dataset_option_names
    from ..training.models import model_option_names

    task = cfg.task
    _options(task.dataset_options, dataset_option_names(task.dataset), ctx, "task.dataset_options",
             f"dataset {task.dataset!r}")
    _options(task.model_options, model_option_names(task.model), ctx, "task.model_options", f"model {task.model!r}")
    _option_values(task.dataset_options, _dataset_option_checkers(task.dataset), ctx, "task.dataset_options")
    _option_values(task.model_options, _model_option_checkers(task.model), ctx, "task.model_options")
    test_fraction = task.dataset_options.get("test_fraction")
    if task.dataset == "text" and test_fraction is not None and task.val_fraction + test_fraction >= 1:
        raise ctx.fail("task.dataset_options.test_fraction", f"a fraction < {1 - task.val_fraction:g} "
                       f"(with task.val_fraction {task.val_fraction:g}, some text must be left to train on)",
                       test_fraction)


def _import_plugin(spec: str, ctx: _Ctx, path: str) -> None:
    """A plug-in must import and name a callable (importing runs the module's top-level code)."""
    from ..errors import UserError
    from ..plugins import load_plugin

    try:
        load_plugin(spec, "plug-in")
    except UserError as exc:
        raise ctx.fail(path, "", raw=str(exc)) from None
    except Exception as exc:  # the module's own code failed while it was imported
        raise ctx.fail(path, "", raw=f"plug-in {spec!r}: importing it raised {type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:150]}") from None


def _space_checks(cfg: Config, space: Any, ctx: _Ctx) -> None:
    _weight_decay_needs_lr(cfg, space, ctx)
    _optimizer_checks(cfg, space, ctx)
    _published_sources(cfg, space, ctx)


def _weight_decay_needs_lr(cfg: Config, space: Any, ctx: _Ctx) -> None:
    """A weight decay in the scripts' convention (wd / lr) needs an lr, fixed or searched."""
    from ..optim.registry import OPTIMIZERS

    fixed, searched = cfg.optimizer.fixed, space.params
    wd_per_lr = OPTIMIZERS[cfg.optimizer.name].decoupled_weight_decay and cfg.task.dataset != "text"
    if wd_per_lr and "lr" not in fixed and "lr" not in searched:
        if "weight_decay" in fixed or "weight_decay" in searched:
            where = "optimizer.fixed.weight_decay" if "weight_decay" in fixed else "optimizer.search_space.params.weight_decay"
            raise ctx.fail(
                where,
                "",
                raw=f"{cfg.optimizer.name} takes weight_decay in the scripts' convention (wd / lr), so it needs lr: "
                "fix lr in optimizer.fixed or search it",
            )


def _published_sources(cfg: Config, space: Any, ctx: _Ctx) -> None:
    """Each source ``optimizer.enqueue_published`` lists is one the space publishes."""
    wanted = cfg.optimizer.enqueue_published
    if isinstance(wanted, list):
        sources = [str(p["source"]) for p in space.published if "source" in p]
        for i, src in enumerate(wanted):
            if src not in sources:
                valid = ", ".join(sources) if sources else "none: the search space lists no published configurations"
                close = difflib.get_close_matches(src, sources, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ctx.fail(
                    f"optimizer.enqueue_published[{i}]", "", raw=f"no published configuration {src!r}{hint}; valid sources: {valid}"
                )


def _value_kind_error(name: str, value: Any, default: Any) -> str | None:
    """Why ``value`` cannot be constructor argument ``name`` whose default is ``default`` (None: it can)."""
    if (error := _not_finite_error(value)) is not None:
        return error
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif _is_number(default):
        ok, expected = _is_number(value), "a number"
    elif isinstance(default, tuple) and all(_is_number(x) for x in default):
        ok = isinstance(value, list) and len(value) == len(default) and all(_is_number(x) for x in value)
        expected = f"a list of {len(default)} numbers"
    else:
        return None
    return None if ok else f"expected {expected}, got {_show(value)}"


def _not_finite_error(value: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {_show(value)}"
    if isinstance(value, list) and any(isinstance(x, float) and not math.isfinite(x) for x in value):
        return f"expected finite numbers, got {_show(value)}"
    return None


def _optimizer_checks(cfg: Config, space: Any, ctx: _Ctx) -> None:
    """Ask the optimizer itself: build it on a dummy parameter with ``optimizer.fixed`` and with each
    bound of each searched parameter (its other searched parameters at their lowest values), so a
    value it refuses (a negative lr, ``lazy_hessian: 0``, a string) fails now, not in every trial."""
    import torch

    from ..optim.registry import OPTIMIZERS

    defaults = OPTIMIZERS[cfg.optimizer.name].config_defaults()
    fixed = cfg.optimizer.fixed
    model = torch.nn.Linear(1, 1)
    # the lr a decoupled weight decay needs (wd / lr): the fixed one, else the constructor's default
    # while the fixed values and a searched lr are checked, the searched lr's low for the others
    lr = {"lr": fixed["lr"]} if "lr" in fixed else {"lr": defaults["lr"]} if _is_number(defaults.get("lr")) else {}
    _fixed_checks(cfg, defaults, lr, model, ctx)
    lowest = {n: (p.choices[0] if p.type == "categorical" else p.low) for n, p in space.params.items()}
    searched = sorted((n for n in space.params if n not in fixed), key=lambda n: n != "lr")  # lr first
    for name in searched:
        lr_of_name = {"lr": lowest["lr"]} if name != "lr" and "lr" in lowest and "lr" not in fixed else lr
        others = {**lr_of_name, **fixed}
        _searched_bound_checks(cfg, name, space.params[name], others, defaults.get(name), model, ctx)
    if (why := _refusal(cfg, model, {**fixed, **{n: lowest[n] for n in searched}})) is not None:
        raise ctx.fail("optimizer.search_space", "", raw=f"its lowest values with optimizer.fixed are refused by "
                       f"{cfg.optimizer.name}: {why}")


def _fixed_checks(cfg: Config, defaults: dict[str, Any], lr: dict[str, Any], model: Any, ctx: _Ctx) -> None:
    """``optimizer.fixed``: each value of the kind its default is, then taken by the optimizer one
    key at a time (an error names the culprit; with the ``lr`` a decoupled weight decay needs),
    then all of them together."""
    fixed = cfg.optimizer.fixed
    for key, value in fixed.items():
        error = _value_kind_error(key, value, defaults.get(key))
        if error:
            raise ctx.fail(f"optimizer.fixed.{key}", "", raw=error)
    for key in fixed:
        if (why := _refusal(cfg, model, {**lr, key: fixed[key]})) is not None:
            raise ctx.fail(f"optimizer.fixed.{key}", "", raw=f"{fixed[key]!r} is refused by {cfg.optimizer.name}: {why}")
    if (why := _refusal(cfg, model, {**lr, **fixed})) is not None:
        raise ctx.fail("optimizer.fixed", "", raw=f"refused by {cfg.optimizer.name}: {why}")


def _searched_bound_checks(
    cfg: Config, name: str, param: Any, others: dict[str, Any], default: Any, model: Any, ctx: _Ctx
) -> None:
    """Each bound (or choice) of searched parameter ``name``: of the kind its default is, and taken
    by the optimizer together with ``others``."""
    where = f"optimizer.search_space.params.{name}"
    if param.type == "categorical":
        candidates = [("choices", c) for c in param.choices or ()]
    else:
        candidates = [("low", param.low), ("high", param.high)]
    for key, value in candidates:
        error = _value_kind_error(name, value, default)
        if error is None:
            why = _refusal(cfg, model, {**others, name: value})
            error = None if why is None else f"{value!r} is refused by {cfg.optimizer.name}: {why}"
        if error is not None:
            raise ctx.fail(f"{where}.{key}", "", raw=error)


def _refusal(cfg: Config, model: Any, values: dict[str, Any]) -> str | None:
    """Why ``cfg``'s optimizer refuses exactly ``values`` (config conventions), built over the dummy
    ``model``; None: it takes them."""
    from ..optim.registry import OPTIMIZERS
    from .spaces import config_hparams

    try:
        OPTIMIZERS[cfg.optimizer.name].build(model, config_hparams(cfg, values))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, RuntimeError, ConfigError) as exc:
        return " ".join(str(exc).split())[:200] or type(exc).__name__
    return None


def with_model_normalization(cfg: Config, normalized: bool | None) -> Config:
    """``cfg`` once its model was built (a plug-in's normalization is known only then): records
    ``normalized``, and when the config names no search space and the default space changes with
    it (:func:`~.spaces.default_space_name`), checks the new space as validation checks one."""
    from .spaces import default_space_name, space_for_config

    if normalized is None or cfg.model_normalized is not None:
        return cfg
    before = default_space_name(cfg)
    cfg.model_normalized = normalized
    if cfg.optimizer.search_space is None and default_space_name(cfg) != before:
        _space_checks(cfg, space_for_config(cfg), _Ctx(cfg.source))
    return cfg


def published_to_enqueue(cfg: Config, space: Any) -> list[dict[str, Any]]:
    """The configurations ``optimizer.enqueue_published`` selects, in enqueue order.

    ``auto``: the space's ``prior:`` (where a study starts; none for a space without one);
    ``false``: none; ``true``: all of ``space.published``; a list of sources: those entries, in the
    list's order. Each item is the entry as written (``source`` included); the values to pass to
    ``study.enqueue_trial`` are the ones whose keys are in ``space.params``.
    """
    wanted = cfg.optimizer.enqueue_published
    if wanted is False:
        return []
    if wanted == "auto":
        return [dict(p) for p in space.prior]
    if wanted is True:
        return [dict(p) for p in space.published]
    by_source = {str(p["source"]): p for p in space.published if "source" in p}
    missing = [s for s in wanted if s not in by_source]
    if missing:
        raise ConfigError(
            f"{cfg.source}: optimizer.enqueue_published: no published configuration {missing[0]!r}; "
            f"valid sources: {', '.join(by_source) or 'none'}"
        )
    return [dict(by_source[s]) for s in wanted]


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, parse and validate a config file (and its search space). ``overrides``: ``--set``
    values (``key.path=value``, :mod:`.overrides`), put into the file's data before it is
    validated; messages then name the config ``FILE with --set``."""
    from .overrides import apply_overrides, overridden_source, parse_overrides

    changes = parse_overrides(overrides)  # a malformed one costs no file read
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such config file")
    raw = apply_overrides(read_yaml_file(p, "config file"), changes)
    # config_from_dict resolves and validates the search space too
    return config_from_dict(raw, source=overridden_source(str(p), changes), base_dir=p.resolve().parent,
                            name_from=str(p))
