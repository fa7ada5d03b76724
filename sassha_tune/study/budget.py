"""The budget: which trials count toward ``budget.n_trials``.

Every trial of the study counts, across runs and workers -- COMPLETE, PRUNED, RUNNING and FAIL --
except waiting (enqueued) trials and FAIL trials whose reason is in :data:`NOT_COUNTED`: ``lost``
(retried), ``interrupted`` (Ctrl-C) or ``over_budget`` (a worker that lost the race for the last
slot).
"""

from __future__ import annotations

from collections.abc import Iterable

from optuna.trial import FrozenTrial, TrialState

__all__ = ["NOT_COUNTED", "counts_toward_budget", "budget_used"]

NOT_COUNTED = frozenset({"lost", "interrupted", "over_budget"})


def counts_toward_budget(t: FrozenTrial) -> bool:
    if t.state == TrialState.WAITING:
        return False
    if t.state == TrialState.FAIL and t.user_attrs.get("failure_reason") in NOT_COUNTED:
        return False
    return True


def budget_used(trials: Iterable[FrozenTrial]) -> int:
    return sum(counts_toward_budget(t) for t in trials)
