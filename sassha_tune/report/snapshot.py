"""One read of a study: the snapshot every part of a report is built from.

A report asks for a study's trials in many places -- its rows, the importances, the log-scale of a
parameter, each of Optuna's plots -- and each ask was a query of the database (13 for one report).
:func:`snapshot_study` reads the trials and the study's attributes once and returns an
:class:`optuna.Study` over a read-only storage that serves them from memory, so every part of the
report (ours and Optuna's) sees the same trials, and the database is read once per study.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Container, Iterator, Sequence
from typing import Any, NoReturn

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

__all__ = ["collector_paused", "snapshot_study"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused (as it was after): reading a study builds millions
    of objects (10,000 trials: Optuna's rows, trials and their attributes), and a collection every
    few thousand of them, each scanning all that are alive, doubled the time the read takes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def snapshot_study(backend: optuna.storages.BaseStorage, study_name: str) -> optuna.Study:
    """``study_name`` of ``backend`` as it is now, read once: an :class:`optuna.Study` whose trials,
    directions and attributes come from memory (its storage refuses writes)."""
    study_id = backend.get_study_id_from_name(study_name)
    with collector_paused():
        trials = backend.get_all_trials(study_id, deepcopy=False)
    storage = _SnapshotStorage(backend, study_id, study_name, backend.get_study_directions(study_id),
                               backend.get_study_user_attrs(study_id), backend.get_study_system_attrs(study_id),
                               trials)
    return optuna.Study(study_name=study_name, storage=storage)


class _SnapshotStorage(optuna.storages.BaseStorage):
    """One study of a storage, frozen when it was read: reads come from memory, writes are refused."""

    def __init__(self, backend: optuna.storages.BaseStorage, study_id: int, name: str,
                 directions: Sequence[StudyDirection], user_attrs: dict[str, Any], system_attrs: dict[str, Any],
                 trials: Sequence[FrozenTrial]) -> None:
        self._backend = backend  # only for what no report asks: a trial by id, the list of studies
        self._study_id = study_id
        self._name = name
        self._directions = list(directions)
        self._user_attrs = user_attrs
        self._system_attrs = system_attrs
        # in number order, as Optuna's own cached storage returns them
        self._trials = sorted(trials, key=lambda t: t.number)

    def _check(self, study_id: int) -> None:
        if study_id != self._study_id:
            raise KeyError(f"no study with id {study_id} in this snapshot")

    @staticmethod
    def _read_only(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise RuntimeError("a report reads a snapshot of the study and never writes to it")

    create_new_study = delete_study = set_study_user_attr = set_study_system_attr = _read_only
    create_new_trial = set_trial_param = set_trial_state_values = set_trial_intermediate_value = _read_only
    set_trial_user_attr = set_trial_system_attr = _read_only

    def get_study_id_from_name(self, study_name: str) -> int:
        if study_name != self._name:
            raise KeyError(f"no study named {study_name!r} in this snapshot")
        return self._study_id

    def get_study_name_from_id(self, study_id: int) -> str:
        self._check(study_id)
        return self._name

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        self._check(study_id)
        return list(self._directions)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        self._check(study_id)
        return self._user_attrs

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        self._check(study_id)
        return self._system_attrs

    def get_all_studies(self) -> list[Any]:
        # the study as the backend describes it (Optuna's FrozenStudy has no public constructor)
        return [s for s in self._backend.get_all_studies() if s.study_name == self._name]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._backend.get_trial(trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        self._check(study_id)
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(list(trials)) if deepcopy else list(trials)
