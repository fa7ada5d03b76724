"""Read-only views of studies for the CLI: ``status`` rows, one study in detail, the best trial,
the config ``export`` writes. Nothing here writes to the storage."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..errors import UserError
from ..metrics.names import EXPORTED_METRICS
from ..version import __version__
from .budget import budget_used, spent_by_outcome
from .records import FAILURE_REASON, TrialRecord
from .storage import load_study, open_storage, with_retry

__all__ = ["study_rows", "study_detail", "spent_line", "best_trial", "export_config", "export_kwargs"]


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
    best = _best_of(study, trials)
    failures = Counter(str(t.user_attrs.get(FAILURE_REASON, "unknown")) for t in trials if t.state == TrialState.FAIL)
    epochs = int((cfg_raw.get("task") or {}).get("epochs") or 0)
    spent = spent_by_outcome((TrialRecord.from_trial(t) for t in trials if t.state.is_finished()), epochs)
    return {
        "name": study.study_name,
        "optimizer": study.user_attrs.get("optimizer", "?"),
        "objectives": study.user_attrs.get("objectives") or [d.name.lower() for d in study.directions],
        "counts": dict(counts),
        "budget": f"{budget_used(trials)}/{n_trials}" if n_trials else "?",
        "best": best,
        "failures": dict(failures),
        "spent": spent,
    }


def spent_line(spent: dict[str, dict[str, float]]) -> str:
    """The one-line form of :func:`~.budget.spent_by_outcome`: ``training spent: 7.4 run-equivalents
    (completed 4.0, pruned 1.2, near chance 0.8, diverged 0.4)``; the outcomes with none are left out."""
    total = sum(v["run_eq"] for v in spent.values())
    parts = [f"{kind.replace('_', ' ')} {v['run_eq']:.1f}" for kind, v in spent.items() if v["trials"]]
    return f"training spent: {total:.1f} run-equivalents" + (f" ({', '.join(parts)})" if parts else "")


def best_trial(study: optuna.Study, number: int | None = None) -> FrozenTrial | None:
    """Trial ``number``, or the best: single objective by value, several by the first (on the front)."""
    return _best_of(study, with_retry(study.get_trials, deepcopy=False), number)


def _best_of(study: optuna.Study, trials: list[FrozenTrial], number: int | None = None) -> FrozenTrial | None:
    """:func:`best_trial` among ``trials``, the study's trials already read."""
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


def _space_fixed(study: optuna.Study) -> dict[str, Any]:
    """The one-choice categoricals of the stored search space: fixed values the trials ran with."""
    from ..config.spaces import fixed_values, space_from_dict

    raw = study.user_attrs.get("search_space")
    if not isinstance(raw, dict) or not raw.get("params"):
        return {}
    return fixed_values(space_from_dict(raw, f"study {study.study_name}"))


def export_config(study: optuna.Study, number: int | None = None) -> dict[str, Any]:
    """The study's config with the chosen trial's params fixed: ``sassha-tune train`` runs it as is."""
    trial = best_trial(study, number)
    if trial is None:
        raise UserError(f"study {study.study_name!r} has no complete trial to export yet")
    if trial.state != TrialState.COMPLETE:
        raise UserError(f"trial {trial.number} of {study.study_name!r} is {trial.state.name}, not COMPLETE")
    d = json.loads(json.dumps(study.user_attrs["config"]))
    d["optimizer"]["fixed"] = {**d["optimizer"].get("fixed", {}), **_space_fixed(study), **dict(trial.params)}
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


def export_kwargs(study: optuna.Study, number: int | None = None) -> dict[str, Any]:
    """The chosen trial's optimizer as constructor arguments (``export --format kwargs``): what a
    user's own loop passes to the class, in the constructor's convention (decoupled weight decay
    already divided by lr where the config's convention is the scripts' ``wd``), the registry's
    defaults included, and the call that builds it."""
    from ..config.spaces import trial_hparams
    from ..optim.registry import optimizer_info
    from .create import stored_config

    d = export_config(study, number)  # the same checks: a COMPLETE trial
    cfg, _ = stored_config(study)
    trial = best_trial(study, d["provenance"]["trial"])
    assert trial is not None  # export_config found it
    info = optimizer_info(cfg.optimizer.name)
    kwargs = {**info.defaults, **trial_hparams(cfg, {**_space_fixed(study), **trial.params})}
    kwargs = json.loads(json.dumps(kwargs))  # plain data: tuples (betas) become lists
    cls = f"sassha_tune.{info.cls.__name__}"
    if info.param_groups is not None:  # SASSHA-LM: decay on linear weights only
        params = f"sassha_tune.linear_weight_groups(model, weight_decay={kwargs.pop('weight_decay', 2e-4)!r})"
    else:
        params = "model.parameters()"
    model = ", model=model" if info.needs_model else ""
    return {
        "optimizer": cfg.optimizer.name,
        "class": cls,
        "kwargs": kwargs,
        "construct": f"{cls}({params}{model}, **kwargs)",
        # not a constructor argument: the learning-rate schedule the trial trained with (none of
        # ours with task.train: the user's function had its own)
        "schedule": None if cfg.task.train else dataclasses.asdict(cfg.schedule),
        "provenance": d["provenance"],
    }

