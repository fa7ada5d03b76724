"""Create a study from a config or continue it; the config and search space it stores.

A study stores its config and search space as plain data (user attributes ``config`` and
``search_space``; no storage URL, the space inline), so every process that joins it runs the same
trials. A continued study may change only the sections in :data:`MUTABLE`; a changed search space
needs ``--allow-space-change`` and is recorded in ``sassha_tune:search_space_history``.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from ..config import Config, config_from_dict, config_from_stored, config_to_dict, published_to_enqueue
from ..config.spaces import SearchSpace, space_for_config, space_from_dict
from ..errors import StorageError, UserError
from ..provenance import git_commit
from ..version import __version__
from .budget import budget_used
from .storage import (
    crash_point,
    create_study_atomically,
    mask_url,
    open_storage,
    study_id,
    study_storage,
    with_retry,
)

__all__ = [
    "MUTABLE",
    "SPACE_HISTORY_KEY",
    "ENQUEUED_KEY",
    "plain",
    "study_payload",
    "create_or_continue",
    "stored_payload",
    "config_from_payload",
    "stored_config",
    "BudgetChange",
    "budget_change",
    "check_budget",
    "set_budget",
    "OVERRIDABLE",
    "overridden_config",
    "store_overridden",
]

SPACE_HISTORY_KEY = "sassha_tune:search_space_history"
#: system attribute: False while a new study's first configurations (prior, published, warm start) are not all enqueued
ENQUEUED_KEY = "sassha_tune:published_enqueued"

# Config sections a continued study may change; anything else changes what a trial means.
MUTABLE = ("budget", "study.sampler", "study.pruner", "study.heartbeat_interval", "study.stale_after", "device", "provenance",
           "study.warm_start", "study.keep_models")  # warm_start: read when the study is created only
#: what ``--set`` may change on a stored study (``resume``, ``worker``): :data:`MUTABLE` but the
#: settings read only when a study is created
OVERRIDABLE = tuple(k for k in MUTABLE if k not in ("study.warm_start", "provenance"))


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


def _stored_where_unwritten(config_d: dict[str, Any], stored: dict[str, Any], implicit: frozenset[str]) -> dict[str, Any]:
    """``config_d`` (a config about to continue a study) with the study's stored value for every
    setting of :data:`~sassha_tune.config.schema.IMPLICIT_KEYS` the config does not write: a study
    created before a default changed keeps its settings (a sampler's seed, when written, still
    applies)."""
    out = copy.deepcopy(config_d)
    for key in implicit:
        section, name = key.split(".")
        if name == "search_space" or name not in stored.get(section, {}):
            continue  # the space: compared, and kept, by the caller
        value = copy.deepcopy(stored[section][name])
        if name == "sampler":
            value["seed"] = out[section][name].get("seed")
        out[section][name] = value
    return out


def study_payload(cfg: Config, space: SearchSpace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, search space) as stored in the study: plain data, no storage URL, space inline."""
    d = config_to_dict(cfg)
    d["study"].pop("storage", None)
    d["optimizer"]["search_space"] = space.to_dict()
    return plain(d), plain(space.to_dict())


def _creation_attrs(cfg: Config, config_d: dict[str, Any], space_d: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The user attributes a study of ``cfg`` is created with (``config`` last: its presence says
    the others are there too)."""
    attrs: dict[str, Any] = {
        **(extra or {}),
        "search_space": space_d,
        "optimizer": cfg.optimizer.name,
        "objectives": [f"{o.metric} {o.direction}" for o in cfg.study.objectives],
        "sassha_tune_version": __version__,
    }
    commit = git_commit()
    if commit:
        attrs["code_commit"] = commit
    attrs["config"] = config_d
    return attrs


def _first_trials(storage: Any, cfg: Config, space: SearchSpace) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """What a new study runs first, as (params, user attributes naming where they came from): the
    best configurations of ``study.warm_start`` (which replace the space's prior under
    ``enqueue_published: auto``), then those ``optimizer.enqueue_published`` selects (the space's
    prior by default): ``published: <source>`` for a published configuration, ``prior: <source>``
    for one of the space's own starting points. Raises :class:`UserError` for a warm-start study
    that is not in the storage (before anything is stored)."""
    first = _warm_start_trials(storage, cfg, space)
    if first and cfg.optimizer.enqueue_published == "auto":
        return first
    published = {str(p.get("source")) for p in space.published}
    for entry in published_to_enqueue(cfg, space):
        source = str(entry.get("source", "published"))
        first.append(({k: v for k, v in entry.items() if k in space.params},
                      {"published" if source in published else "prior": source}))
    return first


def _warm_start_trials(storage: Any, cfg: Config, space: SearchSpace) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """The ``top`` best complete trials of the warm-start study (by its first objective, in its
    direction; trials that ended near chance left out), their parameters restricted to those this
    study searches and lies inside this space (the sampler draws the others)."""
    from ..metrics.chance import acc_near_chance

    warm = cfg.study.warm_start
    if warm is None:
        return []
    names = with_retry(optuna.get_all_study_names, storage)
    if warm["study"] not in names:
        shown = ", ".join(sorted(names)[:5]) or "none"
        raise UserError(f"{cfg.source}: study.warm_start: no study {warm['study']!r} in this storage (studies: {shown})")
    earlier = with_retry(optuna.load_study, study_name=warm["study"], storage=storage)
    sign = 1 if earlier.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    done = [t for t in with_retry(earlier.get_trials, deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.values and acc_near_chance(t.user_attrs.get("val_acc"), t.user_attrs.get("num_classes")) is not True]
    best = sorted(done, key=lambda t: (-sign * t.values[0], t.number))[: warm["top"]]
    out = []
    for t in best:
        params = {k: v for k, v in t.params.items() if k in space.params and space.params[k].contains(v)}
        if params:
            out.append((params, {"warm_start": f"{warm['study']}#{t.number}"}))
    return out


def _enqueue_first(study: optuna.Study, first: list[tuple[dict[str, Any], dict[str, str]]]) -> None:
    """Enqueue a new study's first trials (idempotent: ``skip_if_exists``), then record it done."""
    for params, attrs in first:
        with_retry(study.enqueue_trial, params, user_attrs=attrs, skip_if_exists=True)
    crash_point("create:before-enqueued-mark")
    with_retry(study_storage(study).set_study_system_attr, study_id(study), ENQUEUED_KEY, True)


def _check_unnamed(cfg: Config, names: list[str], storage_url: str) -> None:
    """A config without ``study.name`` may only create the first study of a storage: in one that
    already holds studies, the file-name default would silently join or start one nobody named."""
    if cfg.name_given or not names:
        return
    shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    raise UserError(
        f"{cfg.source}: study.name: expected a name: storage {mask_url(storage_url)} already holds studies "
        f"({shown}); name the study to create or continue (the default would be {cfg.study.name!r}, "
        "from the file name)"
    )


def create_or_continue(
    cfg: Config,
    storage_url: str,
    *,
    allow_space_change: bool = False,
    budget: BudgetChange | None = None,
    log: Callable[[str], None] = print,
    attrs: dict[str, Any] | None = None,
    adopt: bool = False,
) -> optuna.Study:
    """Create the study named in ``cfg`` or continue it; the stored config is the one that runs.

    ``attrs``: more user attributes a new study is created with (in the same transaction).
    ``adopt``: a study without sassha-tune's settings but with trials (seed re-runs stored by
    plain Optuna before ``rerun`` existed) gets them from ``cfg`` instead of being refused.

    Creation is atomic (:func:`~.storage.create_study_atomically`: the study, its directions and
    its attributes in one transaction), so a kill leaves no study or a complete one. A study left
    half-created by an older version (no attributes, no trials) is adopted: its attributes are
    completed from ``cfg``, with a line saying so.

    The budget: ``budget`` (``--n-trials``) sets it, from the config's ``budget.n_trials`` for a new
    study and from the stored one for a continued study (:class:`BudgetChange`; below the trials
    already counted it is refused before anything is written). Without it a continued study keeps
    the larger of its stored budget and the config's, with a line when they differ (a config never
    lowers a stored budget)."""
    space = space_for_config(cfg, check_fixed=True)
    config_d, space_d = study_payload(cfg, space)
    if budget is not None:
        config_d["budget"]["n_trials"] = budget.total(cfg.budget.n_trials)
    asked = _Asked(cfg, storage_url, open_storage(storage_url), space, config_d, space_d, attrs, log)
    names = with_retry(optuna.get_all_study_names, asked.storage)
    _check_unnamed(cfg, names, storage_url)
    crash_point("create:before-create")
    if cfg.study.name not in names and (created := _create(asked)) is not None:
        return created
    # the study exists, or another process created it between our look and our write
    study = with_retry(optuna.load_study, study_name=cfg.study.name, storage=asked.storage)
    if "config" not in study.user_attrs and (adopt or not with_retry(study.get_trials, deepcopy=False)):
        if list(study.directions) == _directions(cfg):
            return _adopt(study, asked, adopt)
        _remove_unfinished(study, asked, adopt)
        return create_or_continue(cfg, storage_url, allow_space_change=allow_space_change, budget=budget, log=log,
                                  attrs=attrs)
    return _continue(study, asked, allow_space_change, budget)


@dataclass(frozen=True)
class _Asked:
    """What :func:`create_or_continue` was asked for: the config, its payload and where it goes."""

    cfg: Config
    storage_url: str
    storage: optuna.storages.BaseStorage
    space: SearchSpace
    config_d: dict[str, Any]
    space_d: dict[str, Any]
    attrs: dict[str, Any] | None
    log: Callable[[str], None]

    def creation_attrs(self) -> dict[str, Any]:
        return _creation_attrs(self.cfg, self.config_d, self.space_d, self.attrs)


def _directions(cfg: Config) -> list[optuna.study.StudyDirection]:
    return [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
            for d in cfg.study.directions]


def _create(asked: _Asked) -> optuna.Study | None:
    """Create the study with its first trials; None when another process created it first."""
    cfg, name = asked.cfg, asked.cfg.study.name
    first = _first_trials(asked.storage, cfg, asked.space)
    system = {ENQUEUED_KEY: False} if first else {}
    if not with_retry(create_study_atomically, asked.storage, name, cfg.study.directions, asked.creation_attrs(),
                      system):
        return None
    study = with_retry(optuna.load_study, study_name=name, storage=asked.storage)
    crash_point("create:after-commit")
    if first:
        _enqueue_first(study, first)
    _set_metric_names(study, list(cfg.study.metrics))
    asked.log(f"created study {name!r} in {mask_url(asked.storage_url)}")
    return study


def _adopt(study: optuna.Study, asked: _Asked, adopt: bool) -> optuna.Study:
    """Store sassha-tune's settings on a study that lacks them (its creation was interrupted, or
    its trials were stored by plain Optuna: ``adopt``), then enqueue its first trials."""
    for key, value in asked.creation_attrs().items():  # config last
        with_retry(study.set_user_attr, key, value)
    asked.log(f"adopted study {asked.cfg.study.name!r} in {mask_url(asked.storage_url)}: "
              + ("its trials were stored without sassha-tune's settings; stored them from this config" if adopt else
                 "its creation was interrupted before its settings were stored; completed them from this config"))
    _enqueue_first(study, _first_trials(asked.storage, asked.cfg, asked.space))
    return study


def _remove_unfinished(study: optuna.Study, asked: _Asked, adopt: bool) -> None:
    """Remove a study without settings whose objectives differ from the config's (its creation was
    interrupted), to create it again; refused when its trials are to be adopted (they are kept)."""
    cfg, name = asked.cfg, asked.cfg.study.name
    if adopt:
        raise UserError(f"study {name!r} exists with objectives {[d.name.lower() for d in study.directions]}; "
                        f"the config asks for {cfg.study.directions}: use a new study.name")
    with_retry(optuna.delete_study, study_name=name, storage=asked.storage)
    asked.log(f"removed study {name!r} from {mask_url(asked.storage_url)}: its creation was interrupted (no settings, "
              "no trials, other objectives); creating it again")


def _stored_settings(study: optuna.Study, asked: _Asked) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the stored config in its current form, the stored search space) of a study to continue;
    refused when sassha-tune did not create it or its objectives differ from the config's."""
    cfg, name = asked.cfg, asked.cfg.study.name
    stored = study.user_attrs.get("config")
    stored_space = study.user_attrs.get("search_space")
    if not isinstance(stored, dict) or not isinstance(stored_space, dict):
        raise StorageError(f"study {name!r} in {mask_url(asked.storage_url)} was not created by sassha-tune; "
                           "pick another study.name")
    if list(study.directions) != _directions(cfg):
        raise UserError(
            f"study {name!r} exists with objectives {study.user_attrs.get('objectives')}; the config asks for "
            f"{[f'{o.metric} {o.direction}' for o in cfg.study.objectives]}: use a new study.name"
        )
    return _in_current_form(stored), stored_space


def _continue(study: optuna.Study, asked: _Asked, allow_space_change: bool,
              budget: BudgetChange | None) -> optuna.Study:
    """Continue a study sassha-tune created: the config may change only :data:`MUTABLE` settings
    (and the search space with ``allow_space_change``); the stored config becomes the one that runs."""
    cfg, name = asked.cfg, asked.cfg.study.name
    stored, stored_space = _stored_settings(study, asked)
    config_d, space_d = asked.config_d, asked.space_d
    config_d["budget"]["n_trials"], budget_note = _continued_budget(study, stored, cfg, budget)  # refused: nothing written
    _set_metric_names(study, list(cfg.study.metrics))
    if "optimizer.search_space" in cfg.implicit:  # a space the config does not name is the study's own
        space_d = stored_space
        config_d = {**config_d, "optimizer": {**config_d["optimizer"], "search_space": stored_space}}
    _change_space(study, stored_space, space_d, allow_space_change, asked.log)
    config_d = _stored_where_unwritten(config_d, stored, cfg.implicit)
    _check_comparable(name, stored, config_d)
    with_retry(study.set_user_attr, "config", config_d)
    if budget_note:
        asked.log(budget_note)
    if with_retry(study_storage(study).get_study_system_attrs, study_id(study)).get(ENQUEUED_KEY) is False:
        _enqueue_first(study, _first_trials(asked.storage, cfg, space_for_config(cfg)))
        asked.log(f"enqueued the first configurations of {name!r} (its creation was interrupted before they were)")
    asked.log(f"continuing study {name!r} in {mask_url(asked.storage_url)} ({len(study.trials)} trials so far)")
    return study


def _change_space(study: optuna.Study, stored_space: dict[str, Any], space_d: dict[str, Any],
                  allow_space_change: bool, log: Callable[[str], None]) -> None:
    """Store ``space_d`` as the study's search space when it differs from ``stored_space`` (the old
    one kept in :data:`SPACE_HISTORY_KEY`); refused without ``allow_space_change``."""
    space_changes = _diff(stored_space, space_d)
    if not space_changes:
        return
    name = study.study_name
    if not allow_space_change:
        raise UserError(
            f"study {name!r} exists with a different search space (changed: {', '.join(space_changes[:4])}); "
            "pass --allow-space-change to continue with the new space, or use a new study.name"
        )
    storage, sid = study_storage(study), study_id(study)
    history = list(with_retry(storage.get_study_system_attrs, sid).get(SPACE_HISTORY_KEY, []))
    history.append({"replaced_at_trial": len(study.trials), "space": stored_space})
    with_retry(storage.set_study_system_attr, sid, SPACE_HISTORY_KEY, history)
    with_retry(study.set_user_attr, "search_space", space_d)
    log(f"search space of {name!r} changed ({', '.join(space_changes[:4])})")


def _check_comparable(name: str, stored: dict[str, Any], config_d: dict[str, Any]) -> None:
    """Refuse a config that changes a setting outside :data:`MUTABLE` (the search space aside)."""
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


_BUDGET_VALUE = re.compile(r"(\+?)([0-9]+)")


@dataclass(frozen=True)
class BudgetChange:
    """A budget asked for (``--n-trials``, ``n_trials=``): ``n`` trials in all, or with ``more``
    (written ``+N``) N more than the budget the study has. ``given`` is the value as written and
    ``option`` its name, for the one-line errors."""

    n: int
    more: bool = False
    given: str = ""
    option: str = "n_trials"

    def total(self, current: int) -> int:
        """The budget this change sets on a study whose budget is ``current``."""
        return current + self.n if self.more else self.n


def budget_change(value: int | str | BudgetChange, option: str = "n_trials") -> BudgetChange:
    """``value`` as a :class:`BudgetChange`: an integer ``N >= 1`` (the total budget) or a string
    ``"N"`` / ``"+N"`` (N more trials); anything else is a :class:`UserError` naming ``option``."""
    if isinstance(value, BudgetChange):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return BudgetChange(value, False, str(value), option)
    match = _BUDGET_VALUE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or int(match.group(2)) < 1:
        raise UserError(f"{option}: expected a total number of trials >= 1, or +N (N >= 1 more than the "
                        f"study's budget), got {value!r}")
    return BudgetChange(int(match.group(2)), bool(match.group(1)), value.strip(), option)


def _checked_budget(study: optuna.Study, change: BudgetChange, current: int) -> tuple[int, int]:
    """(the budget ``change`` sets on ``study``, whose budget is ``current``; the trials counted
    toward it so far); a :class:`UserError` when it would be below those trials."""
    used = budget_used(with_retry(study.get_trials, deepcopy=False))
    new = change.total(current)
    if new < used:
        more = f"+{change.n} means {new}, " if change.more else ""
        raise UserError(
            f"{change.option} {change.given}: {more}below the {used} trials study {study.study_name!r} has "
            f"already counted toward its budget of {current}; expected a total of at least {used}, "
            f"or +N for N more than {current}"
        )
    return new, used


def _continued_budget(study: optuna.Study, stored: dict[str, Any], cfg: Config, change: BudgetChange | None
                      ) -> tuple[int, str]:
    """(the budget a continued study gets, the line that says so or ""): ``change`` applied to its
    stored budget (checked against the trials counted), else the larger of the stored budget and
    the config's."""
    current, name = int(stored["budget"]["n_trials"]), study.study_name
    if change is not None:
        new, used = _checked_budget(study, change, current)
        return new, _budget_line(name, current, new, change, used) if new != current else ""
    written = cfg.budget.n_trials
    if written < current:
        return current, (f"study {name!r} keeps its budget of {current} trials (the config says {written}; "
                         f"--n-trials {written} lowers it)")
    if written > current:
        return written, f"budget of study {name!r}: {current} -> {written} trials (from the config)"
    return written, ""


def _stored_budget(study: optuna.Study) -> tuple[dict[str, Any], int]:
    """(the stored config, its ``budget.n_trials``)."""
    d = dict(stored_payload(study)[0])
    return d, int(_in_current_form(d)["budget"]["n_trials"])


def _budget_line(name: str, current: int, new: int, change: BudgetChange, used: int) -> str:
    return f"budget of study {name!r}: {current} -> {new} trials ({change.option} {change.given}; {used} counted so far)"


def check_budget(study: optuna.Study, n_trials: int | str | BudgetChange) -> int:
    """The budget :func:`set_budget` would set (its :class:`UserError` if refused), nothing written:
    checked before a command's slow preparations, so that a refused budget costs nothing."""
    return _checked_budget(study, budget_change(n_trials), _stored_budget(study)[1])[0]


def set_budget(study: optuna.Study, n_trials: int | str | BudgetChange, *,
               log: Callable[[str], None] = print) -> int:
    """Change ``budget.n_trials`` in the stored config (``--n-trials``: ``N`` in all or ``+N`` more,
    :func:`budget_change`) and return it; a budget below the trials already counted toward it is a
    :class:`UserError`, nothing written. A line says what changed."""
    change = budget_change(n_trials)
    d, current = _stored_budget(study)
    new, used = _checked_budget(study, change, current)
    if new != current:
        d["budget"] = {**d.get("budget", {}), "n_trials": new}
        with_retry(study.set_user_attr, "config", d)
        log(_budget_line(study.study_name, current, new, change, used))
    return new


def _overridable(key: str) -> bool:
    return any(key == m or key.startswith(m + ".") for m in OVERRIDABLE)


def overridden_config(study: optuna.Study, overrides: Sequence[str]) -> tuple[Config, dict[str, Any] | None]:
    """The stored config of ``study`` with ``--set`` overrides (``key.path=value``) applied and
    validated like a config file, and the plain data to store (None without overrides); nothing
    written. Only the settings of :data:`OVERRIDABLE` may change on a stored study (the others
    would make its trials incomparable), and a budget below the trials already counted is refused,
    each as one :class:`UserError` line naming the ``--set``."""
    from ..config.overrides import OPTION, apply_overrides, parse_overrides

    changes = parse_overrides(overrides)
    if not changes:
        return stored_config(study)[0], None
    name = study.study_name
    for o in changes:
        if not _overridable(o.key):
            raise UserError(f"{OPTION} {o.given}: {o.key} cannot change on stored study {name!r} (its trials would "
                            f"not be comparable); {OPTION} on a stored study may change {', '.join(OVERRIDABLE)}")
    current = _in_current_form(stored_payload(study)[0])
    cfg = config_from_dict(apply_overrides(current, changes), source=f"study {name} (stored config) with {OPTION}")
    config_d = study_payload(cfg, space_for_config(cfg))[0]
    config_d["optimizer"]["search_space"] = current["optimizer"]["search_space"]  # as stored, unchanged
    other = [k for k in _diff(current, config_d) if not k.startswith(OVERRIDABLE)]
    if other:  # a short form expanded into a section that may not change
        raise UserError(f"{OPTION}: {', '.join(other[:4])} cannot change on stored study {name!r}")
    written = config_d["budget"]["n_trials"]
    if written != current["budget"]["n_trials"]:
        given = next((o.given for o in changes if o.key.startswith("budget")), str(written))
        _checked_budget(study, BudgetChange(written, False, given.partition("=")[2], f"{OPTION} budget.n_trials"),
                        int(current["budget"]["n_trials"]))
    return cfg, config_d


def store_overridden(study: optuna.Study, config_d: dict[str, Any], overrides: Sequence[str], *,
                     log: Callable[[str], None] = print) -> None:
    """Store the config :func:`overridden_config` returned as the study's (every process of the
    study reads it before its next trial), with a line naming what changed."""
    with_retry(study.set_user_attr, "config", config_d)
    log(f"study {study.study_name!r}: stored config changed by --set {' '.join(overrides)}")
