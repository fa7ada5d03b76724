"""Read-only access to a study for the reports, and its finished trials as rows.

The storage is opened and studies are loaded with :func:`sassha_tune.study.storage.open_storage`
(``create=False``: a report never creates a database file or a table) and
:func:`sassha_tune.study.storage.load_study` (one implementation, one set of messages); every other report
module reaches the storage through this one, and a report reads a study once (:func:`read_study`
returns a snapshot of it, :mod:`.snapshot`).
A row is the typed record of a finished trial (:class:`~sassha_tune.study.records.TrialRecord`,
:func:`load_rows`); the helpers below pick the complete, search and ranked rows and format values
for tables.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from sassha_tune.study.records import SEED_RERUN_ATTR, TrialRecord, as_float
from sassha_tune.study.reruns import SEED_STUDY_SUFFIX
from sassha_tune.study.storage import load_study, mask_url, open_storage

from .snapshot import collector_paused, snapshot_study

__all__ = [
    "SEED_RERUN_ATTR",
    "SEED_STUDY_SUFFIX",
    "as_float",
    "complete_rows",
    "format_value",
    "load_rows",
    "mask_url",
    "optimizer_name",
    "ranked_rows",
    "read_rows",
    "read_storage",
    "read_studies",
    "read_study",
    "sampled_study",
    "search_rows",
    "stored_study_names",
]



# --------------------------------------------------------------------------------------------
# storage access (read only)


def read_storage(storage: str | optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """Open ``storage`` for reading without creating anything that is not there."""
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    return open_storage(str(storage), create=False)


def read_study(study_name: str, backend: optuna.storages.BaseStorage,
               shown_as: str | optuna.storages.BaseStorage) -> optuna.Study:
    """The study as it is now, read once (:func:`~.snapshot.snapshot_study`); a missing one is a
    :class:`StorageError` naming the others."""
    try:
        return snapshot_study(backend, study_name)
    except Exception:
        # loaded only to fail: its one-line error names the study and the storage's others
        load_study(study_name, shown_as if isinstance(shown_as, str) else None, storage=backend)
        raise


def read_studies(study_names: Sequence[str], storage: str | optuna.storages.BaseStorage
                 ) -> tuple[optuna.storages.BaseStorage, set[str], list[tuple[optuna.Study, list[TrialRecord], int]]]:
    """What a report or a comparison reads: ``storage`` opened for reading, the names of all its
    studies, and each of ``study_names`` read once (:func:`read_study`) with its rows and how many
    of its trials are running or waiting (:func:`read_rows`)."""
    backend = read_storage(storage)
    names = stored_study_names(backend)
    studies = [read_study(name, backend, shown_as=storage) for name in study_names]
    return backend, names, [(study, *read_rows(study)) for study in studies]


def stored_study_names(backend: optuna.storages.BaseStorage) -> set[str]:
    """The names of all studies in an opened storage."""
    return set(optuna.study.get_all_study_names(backend))


def optimizer_name(study: optuna.Study) -> str:
    """The study's ``optimizer`` attribute, else its name."""
    return str(study.user_attrs.get("optimizer") or study.study_name)


# --------------------------------------------------------------------------------------------
# rows


_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def read_rows(study: optuna.Study) -> tuple[list[TrialRecord], int]:
    """A study's finished trials as rows (:func:`load_rows`) and how many trials are running or
    waiting (of a snapshot from :func:`read_study`: no read of the storage)."""
    with collector_paused():
        trials = study.get_trials(deepcopy=False)
        finished = sorted((t for t in trials if t.state in _FINISHED), key=lambda t: t.number)
        return [TrialRecord.from_trial(t) for t in finished], len(trials) - len(finished)


def load_rows(study: optuna.Study) -> list[TrialRecord]:
    """One row per finished trial (COMPLETE, PRUNED or FAIL), in trial-number order.

    Each row is a :class:`~sassha_tune.study.records.TrialRecord`: ``number``, ``state`` (name),
    ``params``, ``values`` (``None`` unless complete), ``user_attrs`` and ``duration_s`` (wall
    clock of the trial). RUNNING and WAITING trials are left out, so a report works while the
    study is still running.
    """
    return read_rows(study)[0]


def sampled_study(study: optuna.Study, trials: Sequence[FrozenTrial], limit: int, seed: int = 0) -> optuna.Study:
    """An in-memory study (``study``'s name and directions) of ``trials``, or of a seeded random
    ``limit`` of them when there are more: for Optuna's analyses whose cost grows faster than the
    number of trials (fANOVA, contour plots). Nothing is written to ``study``'s storage."""
    if len(trials) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(trials), size=limit, replace=False))
        trials = [trials[i] for i in keep]
    storage = optuna.storages.InMemoryStorage()
    log = logging.getLogger(type(storage).__module__)  # "a new study created in memory": not the user's
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        storage.create_new_study(directions=list(study.directions), study_name=study.study_name)
    finally:
        log.setLevel(level)
    sample = optuna.Study(study_name=study.study_name, storage=storage)
    sample.add_trials(trials)
    return sample


def complete_rows(rows: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The COMPLETE rows that have a validation accuracy."""
    return [r for r in rows if r.state == "COMPLETE" and not math.isnan(r.val_acc)]


def search_rows(rows: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The rows that are part of the search (seed re-runs excluded)."""
    return [r for r in rows if not r.is_rerun]


def ranked_rows(rows: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Complete trials, best validation accuracy first (ties: lower trial number first)."""
    return sorted(complete_rows(rows), key=lambda r: (-r.val_acc, r.number))


def format_value(value: Any) -> str:
    """A table cell: numbers with 4 significant digits, ``-`` for NaN and missing values."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)
