"""Telling trials: an outcome (its attributes, values or failure reason) -> the storage.

A trial never stays RUNNING because of a value Optuna rejects: it fails with the reason instead.

A trial that diverged is evidence about its region of the search space, but Optuna's samplers
(TPE, GP, CMA-ES) do not look at FAIL trials, so a study that tells it FAIL keeps proposing the
region that diverged. With ``study.diverged_as_pruned`` (the default of new studies) it is told
PRUNED instead, its ``failure_reason: diverged`` kept, after a NaN reported for the epoch in which
it diverged: TPE ranks a pruned trial by its last intermediate value and a NaN as the worst, so it
lands among the bad trials (tests/study/test_tell.py). ``status``, ``report`` and ``compare`` still
count it as diverged (a pruned trial with a ``failure_reason``), and it is never selected.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..trial.attributes import DIVERGED, FAILURE_REASON
from ..trial.outcome import TrialOutcome
from .storage import set_user_attrs, with_retry

__all__ = ["finish", "fail"]


def finish(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, *,
           diverged_as_pruned: bool = False, reports: bool = False) -> FrozenTrial:
    """Store the outcome's user attributes and tell the trial its state (and values).

    ``diverged_as_pruned``: a diverged trial is told PRUNED (see the module docstring), after a NaN
    for the epoch it diverged in when the study ``reports`` a per-epoch value."""
    attrs = dict(outcome.attrs)
    if outcome.state == "fail":
        attrs[FAILURE_REASON] = outcome.failure_reason or "error: unknown"
    with_retry(set_user_attrs, study, trial, attrs)
    if outcome.state == "fail" and diverged_as_pruned and outcome.failure_reason == DIVERGED:
        if reports:
            with_retry(trial.report, float("nan"), len(outcome.history) + 1)
        return _tell(study, trial, state=TrialState.PRUNED)
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
        with_retry(trial.set_user_attr, FAILURE_REASON, f"error: {exc}")
        return with_retry(study.tell, trial, state=TrialState.FAIL, skip_if_finished=True)


def fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Fail the trial with ``failure_reason: reason``; never raises (used while unwinding)."""
    try:
        with_retry(trial.set_user_attr, FAILURE_REASON, reason)
        with_retry(study.tell, trial, state=TrialState.FAIL, skip_if_finished=True)
    except Exception:
        pass
