"""Create a study from a config or continue it; the config and search space it stores.

A study stores its config and search space as plain data (user attributes ``config`` and
``search_space``; no storage URL, the space inline), so every process that joins it runs the same
trials. A continued study may change only the sections in :data:`MUTABLE`; a changed search space
needs ``--allow-space-change`` and is recorded in ``sassha_tune:search_space_history``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import optuna

from ..config import Config, config_from_dict, config_from_stored, config_to_dict, published_to_enqueue
from ..config.spaces import SearchSpace, space_for_config, space_from_dict
from ..errors import StorageError, UserError
from ..provenance import git_commit
from ..version import __version__
from .storage import mask_url, open_storage, study_id, study_storage, with_retry

__all__ = [
    "MUTABLE",
    "SPACE_HISTORY_KEY",
    "plain",
    "study_payload",
    "create_or_continue",
    "stored_payload",
    "config_from_payload",
    "stored_config",
    "set_budget",
]

SPACE_HISTORY_KEY = "sassha_tune:search_space_history"

# Config sections a continued study may change; anything else changes what a trial means.
MUTABLE = ("budget", "study.sampler", "study.pruner", "study.heartbeat_interval", "study.stale_after", "device", "provenance")


def plain(value: Any) -> Any:
    """``value`` as JSON data (what a storage keeps): tuples become lists, keys strings."""
    return json.loads(json.dumps(value))


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [path or "(all)"]


def _in_current_form(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored config as this version writes one: a key that a study stored by an older version
    lacks gets its default, which is what it meant (so continuing that study is no change)."""
    d = config_to_dict(config_from_stored(stored))
    d["study"].pop("storage", None)
    return plain(d)


def study_payload(cfg: Config, space: SearchSpace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, search space) as stored in the study: plain data, no storage URL, space inline."""
    d = config_to_dict(cfg)
    d["study"].pop("storage", None)
    d["optimizer"]["search_space"] = space.to_dict()
    return plain(d), plain(space.to_dict())


def create_or_continue(
    cfg: Config,
    storage_url: str,
    *,
    allow_space_change: bool = False,
    log: Callable[[str], None] = print,
) -> optuna.Study:
    """Create the study named in ``cfg`` or continue it; the stored config is the one that runs."""
    space = space_for_config(cfg, check_fixed=True)
    config_d, space_d = study_payload(cfg, space)
    storage = open_storage(storage_url)
    name = cfg.study.name
    directions = [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
                  for d in cfg.study.directions]
    existing = name in with_retry(optuna.get_all_study_names, storage)
    study = with_retry(
        optuna.create_study, study_name=name, storage=storage, directions=cfg.study.directions, load_if_exists=True
    )
    if not existing and "config" not in study.user_attrs:
        with_retry(study.set_user_attr, "config", config_d)
        with_retry(study.set_user_attr, "search_space", space_d)
        with_retry(study.set_user_attr, "optimizer", cfg.optimizer.name)
        with_retry(study.set_user_attr, "objectives", [f"{o.metric} {o.direction}" for o in cfg.study.objectives])
        with_retry(study.set_user_attr, "sassha_tune_version", __version__)
        commit = git_commit()
        if commit:
            with_retry(study.set_user_attr, "code_commit", commit)
        for entry in published_to_enqueue(cfg, space):
            params = {k: v for k, v in entry.items() if k in space.params}
            with_retry(
                study.enqueue_trial, params, user_attrs={"published": entry.get("source", "published")},
                skip_if_exists=True,
            )
        _set_metric_names(study, list(cfg.study.metrics))
        log(f"created study {name!r} in {mask_url(storage_url)}")
        return study

    stored = study.user_attrs.get("config")
    stored_space = study.user_attrs.get("search_space")
    if not isinstance(stored, dict) or not isinstance(stored_space, dict):
        raise StorageError(f"study {name!r} in {mask_url(storage_url)} was not created by sassha-tune; pick another study.name")
    if list(study.directions) != directions:
        raise UserError(
            f"study {name!r} exists with objectives {study.user_attrs.get('objectives')}; the config asks for "
            f"{[f'{o.metric} {o.direction}' for o in cfg.study.objectives]}: use a new study.name"
        )
    _set_metric_names(study, list(cfg.study.metrics))
    space_changes = _diff(stored_space, space_d)
    if space_changes:
        if not allow_space_change:
            raise UserError(
                f"study {name!r} exists with a different search space (changed: {', '.join(space_changes[:4])}); "
                "pass --allow-space-change to continue with the new space, or use a new study.name"
            )
        storage_, sid = study_storage(study), study_id(study)
        history = list(with_retry(storage_.get_study_system_attrs, sid).get(SPACE_HISTORY_KEY, []))
        history.append({"replaced_at_trial": len(study.trials), "space": stored_space})
        with_retry(storage_.set_study_system_attr, sid, SPACE_HISTORY_KEY, history)
        with_retry(study.set_user_attr, "search_space", space_d)
        log(f"search space of {name!r} changed ({', '.join(space_changes[:4])})")
    stored = _in_current_form(stored)
    other = [
        k for k in _diff({**stored, "optimizer": {**stored.get("optimizer", {}), "search_space": None}},
                         {**config_d, "optimizer": {**config_d["optimizer"], "search_space": None}})
        if not k.startswith(MUTABLE)
    ]
    if other:
        raise UserError(
            f"study {name!r} exists with different settings ({', '.join(other[:4])}); trials would not be "
            "comparable: use a new study.name (budget, sampler, pruner and device may change)"
        )
    with_retry(study.set_user_attr, "config", config_d)
    log(f"continuing study {name!r} in {mask_url(storage_url)} ({len(study.trials)} trials so far)")
    return study


def stored_payload(study: optuna.Study) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (config, search space) plain data a study stores (one read of its user attributes)."""
    attrs = with_retry(lambda: study.user_attrs)
    raw, space_raw = attrs.get("config"), attrs.get("search_space")
    if not isinstance(raw, dict) or not isinstance(space_raw, dict):
        raise StorageError(f"study {study.study_name!r} was not created by sassha-tune (no stored config)")
    return raw, space_raw


def config_from_payload(
    study_name: str, payload: tuple[dict[str, Any], dict[str, Any]], *, validate: bool
) -> tuple[Config, SearchSpace]:
    """The config and search space of a :func:`stored_payload`. ``validate=True``: checked again
    by :func:`~sassha_tune.config.config_from_dict` (before a user action runs on it: a study
    stored by another version may not be valid for this one); ``False``: rebuilt as stored
    (:func:`~sassha_tune.config.config_from_stored`; the data was validated when it was written)."""
    raw, space_raw = payload
    src = f"study {study_name} (stored config)"
    cfg = config_from_dict(raw, source=src) if validate else config_from_stored(raw, source=src)
    return cfg, space_from_dict(space_raw, src, cfg.optimizer.name)


def _set_metric_names(study: optuna.Study, names: list[str]) -> None:
    """The objectives' names (``val_acc``, ...) on the study, so that optuna-dashboard and Optuna's
    plots say "val_acc" instead of "Objective 0"; set again only when they differ (older studies
    get them on their next run)."""
    if study.metric_names == names:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        with_retry(study.set_metric_names, names)


def stored_config(study: optuna.Study) -> tuple[Config, SearchSpace]:
    """The config and search space a study was created from (validated again)."""
    return config_from_payload(study.study_name, stored_payload(study), validate=True)


def set_budget(study: optuna.Study, n_trials: int) -> None:
    """Change ``budget.n_trials`` in the stored config (``--n-trials``)."""
    d = dict(study.user_attrs["config"])
    d["budget"] = {**d.get("budget", {}), "n_trials": int(n_trials)}
    with_retry(study.set_user_attr, "config", d)
