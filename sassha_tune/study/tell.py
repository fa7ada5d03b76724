"""Telling trials: an outcome (its attributes, values or failure reason) -> the storage.

A trial never stays RUNNING because of a value Optuna rejects: it fails with the reason instead.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..trial.outcome import TrialOutcome
from .storage import set_user_attrs, with_retry

__all__ = ["finish", "fail"]


def finish(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> FrozenTrial:
    """Store the outcome's user attributes and tell the trial its state (and values)."""
    attrs = dict(outcome.attrs)
    if outcome.state == "fail":
        attrs["failure_reason"] = outcome.failure_reason or "error: unknown"
    with_retry(set_user_attrs, study, trial, attrs)
    if outcome.state == "fail":
        return _tell(study, trial, state=TrialState.FAIL)
    if outcome.state == "pruned":
        return _tell(study, trial, state=TrialState.PRUNED)
    return _tell(study, trial, values=outcome.values)


def _tell(study: optuna.Study, trial: optuna.Trial, **kwargs: Any) -> FrozenTrial:
    try:
        return with_retry(study.tell, trial, skip_if_finished=True, **kwargs)
    except ValueError as exc:
        # e.g. a value Optuna rejects: the trial fails rather than staying RUNNING
        with_retry(trial.set_user_attr, "failure_reason", f"error: {exc}")
        return with_retry(study.tell, trial, state=TrialState.FAIL, skip_if_finished=True)


def fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Fail the trial with ``failure_reason: reason``; never raises (used while unwinding)."""
    try:
        with_retry(trial.set_user_attr, "failure_reason", reason)
        with_retry(study.tell, trial, state=TrialState.FAIL, skip_if_finished=True)
    except Exception:
        pass
