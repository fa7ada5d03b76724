"""The budget: which trials count toward ``budget.n_trials``, and where the training went.

Every trial of the study counts, across runs and workers -- COMPLETE, PRUNED, RUNNING and FAIL --
except waiting (enqueued) trials and FAIL trials whose reason is in :data:`NOT_COUNTED`: ``lost``
(retried), ``interrupted`` (Ctrl-C) or ``over_budget`` (a worker that lost the race for the last
slot).

What a search really costs is training: :func:`run_equivalents` counts it in *run-equivalents*,
the epochs every finished trial trained (to the step, ``epochs_trained``; a pruned or failed trial
counts what it trained) over the epochs of one full run, and :func:`spent_by_outcome` splits it by
how each trial ended (:data:`OUTCOMES`), for ``status`` and ``report``.
"""

from __future__ import annotations

from collections.abc import Iterable

from optuna.trial import FrozenTrial, TrialState

from ..metrics.chance import acc_near_chance
from .records import DIVERGED, FAILURE_REASON, NEAR_CHANCE, NUM_CLASSES, VAL_ACC, TrialRecord

__all__ = ["NOT_COUNTED", "OUTCOMES", "counts_toward_budget", "budget_used", "outcome", "run_equivalents",
           "spent_by_outcome"]

#: How a finished trial ended, for the split of the training spent: it trained to the end
#: (``completed``), ended or was stopped near chance (``near_chance``), was stopped by the pruner
#: (``pruned``), diverged (``diverged``, told FAIL or, by default, PRUNED), or failed otherwise.
OUTCOMES = ("completed", "near_chance", "pruned", "diverged", "failed")

NOT_COUNTED = frozenset({"lost", "interrupted", "over_budget"})


def counts_toward_budget(t: FrozenTrial) -> bool:
    if t.state == TrialState.WAITING:
        return False
    if t.state == TrialState.FAIL and t.user_attrs.get(FAILURE_REASON) in NOT_COUNTED:
        return False
    return True


def budget_used(trials: Iterable[FrozenTrial]) -> int:
    return sum(counts_toward_budget(t) for t in trials)


def outcome(record: TrialRecord) -> str | None:
    """One of :data:`OUTCOMES` for a finished trial (None for a running or waiting one)."""
    if record.failure_reason == DIVERGED:
        return "diverged"
    if record.state == "FAIL":
        return "failed"
    if record.state == "PRUNED":
        return "near_chance" if record.prune_reason == NEAR_CHANCE else "pruned"
    if record.state == "COMPLETE":
        stalled = acc_near_chance(record.user_attrs.get(VAL_ACC), record.user_attrs.get(NUM_CLASSES)) is True
        return "near_chance" if stalled else "completed"
    return None


def run_equivalents(record: TrialRecord, epochs: int) -> float:
    """The training one finished trial cost, in full runs of ``epochs`` epochs: ``epochs_trained``
    (to the step), else the epochs it completed (trials stored before ``epochs_trained``)."""
    trained = record.epochs_trained
    if isinstance(trained, bool) or not isinstance(trained, int | float) or epochs < 1:
        return 0.0
    return float(trained) / epochs


def spent_by_outcome(records: Iterable[TrialRecord], epochs: int) -> dict[str, dict[str, float]]:
    """``{outcome: {"trials": n, "run_eq": r}}`` over the finished trials of ``records``, every
    outcome of :data:`OUTCOMES` present (zeros included), in that order."""
    out = {kind: {"trials": 0, "run_eq": 0.0} for kind in OUTCOMES}
    for record in records:
        kind = outcome(record)
        if kind is None:
            continue
        out[kind]["trials"] += 1
        out[kind]["run_eq"] += run_equivalents(record, epochs)
    return out
