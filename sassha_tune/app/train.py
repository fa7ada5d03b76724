"""``sassha-tune train``: one run of a config with its fixed hyperparameters (an exported config,
or any config with ``--params``), no study. Everything that can be refused (a missing device, an
output path that is a link or in no directory, a params file naming unknown hyperparameters) is
refused before any data is loaded or a step is taken."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .base import Log
from .outputs import check_output, write_output

if TYPE_CHECKING:
    from ..config import Config
    from ..trial.outcome import TrialOutcome

__all__ = ["TrainRun", "train_once", "write_metrics"]


@dataclass(frozen=True)
class TrainRun:
    """What :func:`train_once` ran: the ``optimizer``, the ``task`` (``dataset/model``, or the
    user's train function) and the ``outcome`` the trial would have stored."""

    optimizer: str
    task: str
    outcome: TrialOutcome


def train_once(config: Path, *, params: Path | None = None, device: str | None = None, seed: int | None = None,
               overrides: Sequence[str] = (), save: Path | None = None, metrics_out: Path | None = None,
               log: Log) -> TrainRun:
    """Train ``config`` once (``--set`` ``overrides`` applied, ``seed`` over the config's) with
    its fixed hyperparameters and those of the ``params`` file; ``save``: the trained model's file.
    ``metrics_out`` is only checked here (:func:`write_metrics` writes it)."""
    from ..devices import check_available
    from ..trial.objective import evaluate_params

    for path, option in ((metrics_out, "--metrics-out"), (save, "--save")):
        if path is not None:
            check_output(path, option)  # before anything is trained
    cfg = _config(config, overrides, seed, save)
    check_available(device or cfg.device.name)  # before any data is loaded or a step is taken
    extra = _params_file(params, cfg) if params is not None else {}
    _note_unset(cfg, extra, log)
    outcome = evaluate_params(cfg, extra, device=device, save_model=None if save is None else str(save))
    return TrainRun(cfg.optimizer.name, cfg.task.train or f"{cfg.task.dataset}/{cfg.task.model}", outcome)


def write_metrics(path: Path, outcome: TrialOutcome) -> None:
    """``--metrics-out``: the run's state, failure reason and metrics as JSON."""
    payload = {"state": outcome.state, "failure_reason": outcome.failure_reason, **outcome.attrs}
    write_output(path, json.dumps(payload, indent=2) + "\n", "--metrics-out")


def _config(config: Path, overrides: Sequence[str], seed: int | None, save: Path | None) -> Config:
    from ..config import load_config

    cfg = load_config(config, overrides)
    if save is not None and cfg.task.train is not None:
        raise UserError("--save: keeps the model of the built-in trainer; your task.train function has its model: "
                        "save it there")
    if seed is not None:
        cfg.seed = seed
    return cfg


def _params_file(params: Path, cfg: Config) -> dict[str, Any]:
    """``--params``: a mapping of hyperparameters (the config's convention) over ``optimizer.fixed``."""
    from ..config.spaces import check_param_names
    from ..config.yamlfile import read_yaml_file

    if not params.is_file():
        raise UserError(f"--params {params}: no such file")
    raw = read_yaml_file(params, "params file")
    if not isinstance(raw, dict):
        raise UserError(f"{params}: expected a mapping of hyperparameter names to values")
    check_param_names(cfg.optimizer.name, list(raw), str(params), "params")
    return raw


def _note_unset(cfg: Config, extra: dict[str, Any], log: Log) -> None:
    """A searched hyperparameter neither fixed nor in the params file runs at the optimizer's default."""
    from ..config.spaces import space_for_config

    unset = sorted(set(space_for_config(cfg).params) - set(cfg.optimizer.fixed) - set(extra))
    if unset:
        log(f"note: {', '.join(unset)} not fixed: the optimizer's defaults are used")
