"""Read-only views of studies for the CLI: ``status`` rows, one study in detail, the best trial,
the config ``export`` writes. Nothing here writes to the storage."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import __version__
from ..errors import UserError
from ..metrics.names import EXPORTED_METRICS
from .budget import budget_used
from .storage import load_study, open_storage, with_retry

__all__ = ["study_rows", "study_detail", "best_trial", "export_config"]


def study_rows(storage_url: str) -> list[dict[str, Any]]:
    storage = open_storage(storage_url, create=False)
    rows = []
    for s in with_retry(optuna.get_all_study_summaries, storage, include_best_trial=False):
        study = load_study(s.study_name, storage_url, storage=storage)
        rows.append(study_detail(study))
    return rows


def study_detail(study: optuna.Study) -> dict[str, Any]:
    trials = with_retry(study.get_trials, deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    cfg_raw = study.user_attrs.get("config") or {}
    n_trials = (cfg_raw.get("budget") or {}).get("n_trials")
    best = best_trial(study)
    failures = Counter(str(t.user_attrs.get("failure_reason", "unknown")) for t in trials if t.state == TrialState.FAIL)
    return {
        "name": study.study_name,
        "optimizer": study.user_attrs.get("optimizer", "?"),
        "objectives": study.user_attrs.get("objectives") or [d.name.lower() for d in study.directions],
        "counts": dict(counts),
        "budget": f"{budget_used(trials)}/{n_trials}" if n_trials else "?",
        "best": best,
        "failures": dict(failures),
    }


def best_trial(study: optuna.Study, number: int | None = None) -> FrozenTrial | None:
    """Trial ``number``, or the best: single objective by value, several by the first (on the front)."""
    trials = with_retry(study.get_trials, deepcopy=False)
    if number is not None:
        for t in trials:
            if t.number == number:
                return t
        raise UserError(f"study {study.study_name!r} has no trial {number}")
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    if not done:
        return None
    if len(study.directions) == 1:
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        return max(done, key=lambda t: (sign * t.values[0], -t.number))
    front = with_retry(lambda: study.best_trials)
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(front or done, key=lambda t: (sign * t.values[0], -t.number))


def export_config(study: optuna.Study, number: int | None = None) -> dict[str, Any]:
    """The study's config with the chosen trial's params fixed: ``sassha-tune train`` runs it as is."""
    trial = best_trial(study, number)
    if trial is None:
        raise UserError(f"study {study.study_name!r} has no complete trial to export yet")
    if trial.state != TrialState.COMPLETE:
        raise UserError(f"trial {trial.number} of {study.study_name!r} is {trial.state.name}, not COMPLETE")
    d = json.loads(json.dumps(study.user_attrs["config"]))
    d["optimizer"]["fixed"] = {**d["optimizer"].get("fixed", {}), **dict(trial.params)}
    d["optimizer"].pop("enqueue_published", None)
    metrics = {k: trial.user_attrs.get(k) for k in EXPORTED_METRICS if k in trial.user_attrs}
    d["provenance"] = {
        "study": study.study_name,
        "trial": trial.number,
        "values": list(trial.values or []),
        "metrics": metrics,
        "sassha_tune_version": __version__,
    }
    return d
