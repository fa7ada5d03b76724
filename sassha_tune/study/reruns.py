"""Seed re-runs of a study's chosen configuration (``sassha-tune rerun``), on the study machinery.

The re-runs of study ``S`` live in its companion study ``S-seeds`` (same storage, same config and
search space, no pruner, no chance guard, nothing enqueued at creation). Each re-run is a trial
enqueued there with the chosen trial's parameters and the user attributes ``seed`` (the training
seed it runs with), ``seed_rerun_of`` (the chosen trial's number) and ``rerun_of_study``; the
ordinary study loop runs them (heartbeats, lost trials retried with their seed, Ctrl-C, the trial
timeout), and a companion study runs only the trials enqueued in it (:func:`runs_only_enqueued`).
Re-running the same command enqueues only the seeds that have no trial that counts (a lost or
interrupted re-run is enqueued again), so it is resumable like a study. ``report`` and ``compare``
read the companion's trials as seed re-runs (:mod:`sassha_tune.report.reruns`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import Config, config_from_dict, config_to_dict
from ..errors import UserError
from ..trial.attributes import RERUN_OF_STUDY, SEED_ATTR, SEED_RERUN_ATTR
from .budget import budget_used, counts_toward_budget
from .create import BudgetChange, create_or_continue, stored_config
from .storage import load_study, study_storage, with_retry
from .views import best_trial

__all__ = ["SEED_STUDY_SUFFIX", "parse_seeds", "companion_name", "runs_only_enqueued", "prepare_reruns"]

#: A study named ``<base>{SEED_STUDY_SUFFIX}`` holds the seed re-runs of ``<base>``'s trials.
SEED_STUDY_SUFFIX = "-seeds"

Log = Callable[[str], None]


def parse_seeds(text: str | Sequence[int], option: str = "--seeds") -> list[int]:
    """``1,2,3`` (or a list of integers) as distinct seeds in ``0..2**63-1``; anything else one
    :class:`UserError` line naming ``option``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    seeds: list[int] = []
    for item in items:
        value = item.strip() if isinstance(item, str) else item
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise UserError(f"{option}: expected comma-separated seeds (integers >= 0) like 1,2,3, got {text!r}")
        if value in seeds:
            raise UserError(f"{option}: seed {value} listed twice in {text!r}")
        seeds.append(value)
    if not seeds:
        raise UserError(f"{option}: expected at least one seed, like 1,2,3")
    return seeds


def companion_name(study_name: str) -> str:
    return study_name + SEED_STUDY_SUFFIX


def runs_only_enqueued(study_attrs: dict[str, Any]) -> bool:
    """Whether a study (its user attributes) is a companion of re-runs: the loop runs only its
    enqueued trials, one at a time, and asks the sampler for none."""
    return RERUN_OF_STUDY in study_attrs


def _companion_config(cfg: Config, name: str, n_trials: int) -> Config:
    """The companion's config: the study's, under its own name, with nothing that stops a trial
    early or enqueues trials of its own."""
    d = copy.deepcopy(config_to_dict(cfg))
    d["study"].update(name=name, pruner={"name": "none"}, warm_start=None)
    if cfg.task.train is None:
        d["study"]["chance_guard"] = 0  # a re-run is measured to the end, at chance or not
    d["optimizer"]["enqueue_published"] = False
    d["budget"]["n_trials"] = n_trials
    return config_from_dict(d, source=f"study {name} (re-runs of {cfg.study.name})")


def _chosen(study: optuna.Study, number: int | None) -> FrozenTrial:
    trial = best_trial(study, number)
    if trial is None:
        raise UserError(f"study {study.study_name!r} has no complete trial to re-run yet")
    if trial.state != TrialState.COMPLETE:
        raise UserError(f"--trial {trial.number}: trial {trial.number} of {study.study_name!r} is "
                        f"{trial.state.name}, not COMPLETE")
    return trial


def _missing(trials: Sequence[FrozenTrial], number: int, seeds: Sequence[int]) -> list[int]:
    """The seeds of ``seeds`` without a trial of re-run ``number`` that waits, runs or counts."""
    have = {t.user_attrs.get(SEED_ATTR) for t in trials
            if t.user_attrs.get(SEED_RERUN_ATTR) == number and (counts_toward_budget(t) or t.state == TrialState.WAITING)}
    return [s for s in seeds if s not in have]


def prepare_reruns(study_name: str, storage_url: str, seeds: Sequence[int], *, number: int | None = None,
                   log: Log = print) -> tuple[str, Config]:
    """Create (or continue) ``<study>-seeds`` and enqueue the re-runs of trial ``number`` (default:
    the best, as ``export`` chooses it) for the ``seeds`` it lacks; its budget becomes the re-runs
    counted and waiting. Returns the companion's name and config. Refused with one line: a study
    that is itself a companion, a trial that is not COMPLETE, a trial whose parameters are not the
    study's search space (it ran before ``--allow-space-change``)."""
    study = load_study(study_name, storage_url)
    trial, cfg = _rerunnable(study, number)
    name = companion_name(study_name)
    names = with_retry(optuna.get_all_study_names, study_storage(study))
    trials: list[FrozenTrial] = []
    if name in names:
        trials = with_retry(load_study(name, storage_url).get_trials, deepcopy=False)
    missing = _missing(trials, trial.number, seeds)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    total = budget_used(trials) + waiting + len(missing)
    given = ",".join(map(str, seeds))
    companion_cfg = _companion_config(cfg, name, total)
    companion = create_or_continue(companion_cfg, storage_url, budget=BudgetChange(total, False, given, "--seeds"),
                                   log=log, attrs={RERUN_OF_STUDY: study_name}, adopt=bool(trials))
    if not runs_only_enqueued(with_retry(lambda: companion.user_attrs)):
        with_retry(companion.set_user_attr, RERUN_OF_STUDY, study_name)
    for seed in missing:
        with_retry(companion.enqueue_trial, dict(trial.params),
                   user_attrs={SEED_ATTR: seed, SEED_RERUN_ATTR: trial.number, RERUN_OF_STUDY: study_name})
    log(_enqueued_line(study_name, name, trial, cfg, seeds, missing))
    return name, companion_cfg


def _rerunnable(study: optuna.Study, number: int | None) -> tuple[FrozenTrial, Config]:
    """(trial ``number`` of ``study``, or its best; the study's stored config), refused when the
    study holds re-runs itself or the trial cannot be re-run as it ran."""
    attrs = with_retry(lambda: study.user_attrs)
    if runs_only_enqueued(attrs):
        raise UserError(f"study {study.study_name!r} holds re-runs itself (of {attrs[RERUN_OF_STUDY]!r}); "
                        "re-run that study")
    trial = _chosen(study, number)
    cfg, space = stored_config(study)
    searched = sorted(n for n, p in space.params.items() if not p.is_fixed)  # one-choice values are not suggested
    if sorted(trial.params) != searched:
        raise UserError(f"trial {trial.number} of {study.study_name!r} ran with parameters {sorted(trial.params)}, "
                        f"the study's search space now searches {searched}: it cannot be re-run as it ran")
    return trial, cfg


def _enqueued_line(study_name: str, name: str, trial: FrozenTrial, cfg: Config, seeds: Sequence[int],
                   missing: list[int]) -> str:
    """The line saying which seeds of trial ``trial`` were enqueued in companion ``name``."""
    done = [s for s in seeds if s not in missing]
    value = ", ".join(f"{m}={v:.4g}" for m, v in zip(cfg.study.metrics, trial.values or [], strict=False))
    return (f"re-runs of trial {trial.number} of {study_name!r} ({value}) in {name!r}: seeds "
            + (f"{', '.join(map(str, missing))} enqueued" if missing else "all enqueued before")
            + (f"; {', '.join(map(str, done))} there already" if done and missing else ""))
