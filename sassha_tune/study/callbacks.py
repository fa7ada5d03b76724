"""``study.callbacks``: what is told of every finished trial, e.g. to an experiment tracker.

Each entry is a built-in tracker or a ``package.module:factory`` plug-in, with ``options``::

    study:
      callbacks:
        - {name: mlflow, options: {tracking_uri: "sqlite:///mlflow.db"}}
        - "mytracking.hooks:make_callback"          # factory(**options) -> callback

The config parses the entries (:func:`sassha_tune.config.search.parse_callbacks`); this module
builds and calls them.

A callback is Optuna's: ``callback(study, frozen_trial)``, called after each trial is told (every
state: complete, pruned, failed), in the process that ran the trial (each ``--gpus`` worker
builds its own). The built-ins are optuna-integration's ``MLflowCallback``,
``WeightsAndBiasesCallback`` and ``TensorBoardCallback``, with the study's metric names; each needs
its extra (``pip install "sassha-tune[mlflow]"``, ...). Nothing here sends data anywhere on its own:
MLflow's telemetry is off unless you turned it on, and W&B runs offline unless its options say
``wandb_kwargs: {mode: online}``.

A callback that raises does not stop the study (the trial is stored already): its error is one
``warning:`` line.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..config.search import BUILTIN_CALLBACKS, callback_label
from ..errors import UserError
from ..plugins import load_plugin

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = ["Callback", "check_callbacks", "make_callbacks", "notify"]

Callback = Callable[["optuna.Study", "FrozenTrial"], None]


def check_callbacks(entries: Sequence[Mapping[str, Any]]) -> None:
    """Before a study is created: for ``study.callbacks`` (``entries``), every built-in's packages
    are installed. Nothing is built; plug-in factories were imported when the config was validated."""
    for i, entry in enumerate(entries):
        name = entry["name"]
        if name in BUILTIN_CALLBACKS:
            modules, extra = BUILTIN_CALLBACKS[name]
            missing = [m for m in modules if not _installed(m)]
            if missing:
                raise UserError(f"{callback_label(i)}: {name!r} needs {', '.join(missing)} "
                                f"(pip install \"sassha-tune[{extra}]\")")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module that replaced itself in sys.modules (optuna_integration's lazy loader)
        return module in sys.modules


def make_callbacks(entries: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[tuple[str, Callback]]:
    """``study.callbacks`` built, for a study of objectives ``metrics``: (name, callback) in order."""
    from ..trial.outcome import one_line

    check_callbacks(entries)
    built = []
    for i, entry in enumerate(entries):
        name, options = entry["name"], dict(entry["options"])
        try:
            callback = (_builtin(name, metrics, options) if name in BUILTIN_CALLBACKS
                        else load_plugin(name, callback_label(i))(**options))
        except UserError:
            raise
        except Exception as exc:  # options the tracker or factory rejects
            raise UserError(f"{callback_label(i)}: {name!r} could not be set up: {one_line(exc)}") from None
        if not callable(callback):
            raise UserError(f"{callback_label(i)}: {name!r} returned {type(callback).__name__}, not a callback(study, trial)")
        built.append((name, callback))
    return built


def _builtin(name: str, metrics: Sequence[str], options: dict[str, Any]) -> Callback:
    metric_name: str | list[str] = metrics[0] if len(metrics) == 1 else list(metrics)
    if name == "mlflow":
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no data leaves the machine on our account
        from optuna_integration import MLflowCallback

        return MLflowCallback(metric_name=metric_name, **options)
    if name == "wandb":
        from optuna_integration import WeightsAndBiasesCallback

        kwargs = {"mode": "offline", **dict(options.pop("wandb_kwargs", None) or {})}
        return WeightsAndBiasesCallback(metric_name=metric_name, wandb_kwargs=kwargs, **options)
    from optuna_integration import TensorBoardCallback

    if len(metrics) > 1:
        raise UserError("study.callbacks: 'tensorboard' logs one objective; this study has several")
    return TensorBoardCallback(metric_name=metrics[0], **options)


def notify(callbacks: Sequence[tuple[str, Callback]], study: optuna.Study, frozen: FrozenTrial,
           log: Callable[[str], None]) -> None:
    """Tell every callback about a finished trial; one that raises gets a warning line."""
    from ..trial.outcome import one_line

    for name, callback in callbacks:
        try:
            callback(study, frozen)
        except Exception as exc:
            log(f"warning: callback {name} failed after trial {frozen.number}: {one_line(exc)}")

