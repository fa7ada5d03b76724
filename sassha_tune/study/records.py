"""A stored trial as one typed record, and the names of the attributes it is read by.

A finished trial leaves its result in the storage as Optuna user attributes (the metrics of
:data:`~sassha_tune.metrics.names.STORED_ATTRS`, its per-epoch ``history``, why it failed or was
pruned, whether it is a seed re-run ...). The writers (the trial, :mod:`.tell`, the study loop,
:mod:`.reruns`) and the readers (``status``, ``export``, ``report``, ``compare``) name those
attributes with the constants of :mod:`sassha_tune.trial.attributes` (re-exported here for the
readers), and the readers see a trial as a :class:`TrialRecord`: typed fields and accessors
instead of string keys into a dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from ..metrics.chance import acc_near_chance
from ..trial.attributes import (
    DEVICE,
    DIVERGED,
    EPOCHS_COMPLETED,
    EPOCHS_TRAINED,
    FAILURE_REASON,
    HISTORY,
    NEAR_CHANCE,
    NUM_CLASSES,
    PRUNE_REASON,
    SEED_RERUN_ATTR,
    VAL_ACC,
)

# the attribute names are re-exported for the readers, which see a stored trial through this module
__all__ = ["TrialRecord", "as_float", "near_chance", "val_acc_of", "DEVICE", "DIVERGED", "EPOCHS_COMPLETED", "EPOCHS_TRAINED",
           "FAILURE_REASON", "HISTORY", "NEAR_CHANCE", "NUM_CLASSES", "PRUNE_REASON", "SEED_RERUN_ATTR", "VAL_ACC"]


def as_float(value: Any) -> float:
    """``value`` as a float, NaN when missing or not a number."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass(frozen=True)
class TrialRecord:
    """One stored trial as the readers see it: ``number``, ``state`` (its name: ``COMPLETE``,
    ``PRUNED``, ``FAIL``, ``RUNNING``, ``WAITING``), ``params``, ``values`` (``None`` unless
    complete), every stored ``user_attrs`` and ``duration_s`` (its wall clock; ``None`` unless it
    started and finished)."""

    number: int
    state: str
    params: Mapping[str, Any]
    values: list[float] | None
    user_attrs: Mapping[str, Any]
    duration_s: float | None = None

    @classmethod
    def from_trial(cls, trial: FrozenTrial) -> TrialRecord:
        duration = None
        if trial.datetime_start is not None and trial.datetime_complete is not None:
            duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
        return cls(trial.number, trial.state.name, dict(trial.params),
                   list(trial.values) if trial.values is not None else None, dict(trial.user_attrs), duration)

    def metric(self, key: str) -> float:
        """Stored attribute ``key`` as a float (NaN when missing or not a number)."""
        return as_float(self.user_attrs.get(key))

    @property
    def val_acc(self) -> float:
        """:func:`val_acc_of` this trial."""
        return val_acc_of(self.values, self.user_attrs)

    @property
    def failure_reason(self) -> Any:
        return self.user_attrs.get(FAILURE_REASON)

    @property
    def prune_reason(self) -> Any:
        return self.user_attrs.get(PRUNE_REASON)

    @property
    def rerun_of(self) -> Any:
        """The trial number a seed re-run repeats; ``None`` for a search trial."""
        return self.user_attrs.get(SEED_RERUN_ATTR)

    @property
    def is_rerun(self) -> bool:
        return self.rerun_of is not None

    @property
    def history(self) -> list[Any]:
        return self.user_attrs.get(HISTORY) or []

    @property
    def epochs_trained(self) -> Any:
        """``epochs_trained`` (to the step), else ``epochs_completed`` (older trials), else ``None``."""
        return self.user_attrs.get(EPOCHS_TRAINED, self.user_attrs.get(EPOCHS_COMPLETED))

    @property
    def near_chance(self) -> bool | None:
        """:func:`near_chance` of this trial."""
        return near_chance(self.state, self.user_attrs)


def val_acc_of(values: Sequence[Any] | None, user_attrs: Mapping[str, Any]) -> float:
    """A trial's validation accuracy: its stored ``val_acc``, else its first objective value (NaN: neither)."""
    value = as_float(user_attrs.get(VAL_ACC))
    if math.isnan(value) and values:
        value = as_float(values[0])
    return value


def near_chance(state: str | TrialState, user_attrs: Mapping[str, Any]) -> bool | None:
    """Whether a trial finished near chance accuracy: COMPLETE and
    ``val_acc <= near_chance_threshold(num_classes)`` (a collapsed or untrained network).

    ``None`` (unknown) when the trial does not store ``num_classes`` or ``val_acc`` (studies from
    before ``num_classes`` was stored): the number of classes is never guessed, and the first
    objective value is not taken for ``val_acc`` (it may be another metric). ``False`` for trials
    that are not COMPLETE: they are failed or pruned, not near chance.
    """
    name = state.name if isinstance(state, TrialState) else str(state)
    if name != "COMPLETE":
        return False
    return acc_near_chance(as_float(user_attrs.get(VAL_ACC)), user_attrs.get(NUM_CLASSES))
