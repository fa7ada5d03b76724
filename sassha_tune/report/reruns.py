"""Seed re-runs: the re-run rows of a study and the table that summarises them over seeds.

A trial with user attribute ``seed_rerun_of`` is a re-run of that trial's config; so is every
trial of the companion study ``<study>-seeds``. Both reports show the same table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna

from .rows import (
    SEED_RERUN_ATTR,
    SEED_STUDY_SUFFIX,
    is_rerun,
    load_rows,
    optimizer_name,
    read_storage,
    read_study,
    row_attr,
    row_val_acc,
)

__all__ = ["rerun_table"]


def _seed_rerun_rows(study: optuna.Study, rows: Sequence[dict[str, Any]],
                     storage: str | optuna.storages.BaseStorage | None,
                     names_in_storage: set[str]) -> list[dict[str, Any]]:
    """Re-run rows for ``study`` (``rows``: its rows): its trials marked ``seed_rerun_of`` and the
    trials of ``<name>-seeds``."""
    rows = [r for r in rows if is_rerun(r)]
    companion = study.study_name + SEED_STUDY_SUFFIX
    if storage is not None and companion in names_in_storage:
        backend = read_storage(storage)
        rows += load_rows(read_study(companion, backend, shown_as=storage))
    return rows


def _mean_std(values: Sequence[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return f"{np.mean(finite):.4g} ± {std:.2g}"


def rerun_table(studies: Sequence[optuna.Study], storage: Any, names_in_storage: set[str],
                rows: Sequence[Sequence[dict[str, Any]]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the re-run table: per study and re-run group (``seed_rerun_of``, or
    ``best`` for companion-study trials without it) the number of seeds, the failed ones and the
    mean ± sample std of val_acc, test_acc and lambda_max over the complete ones. ``rows``: each
    study's rows, when already read."""
    headers = ["study", "optimizer", "rerun_of", "seeds", "failed", "val_acc", "test_acc", "lambda_max"]
    table = []
    for i, study in enumerate(studies):
        rows_i = load_rows(study) if rows is None else rows[i]
        rows_i = _seed_rerun_rows(study, rows_i, storage, names_in_storage)
        if not rows_i:
            continue
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows_i:
            groups.setdefault(str(r["user_attrs"].get(SEED_RERUN_ATTR, "best")), []).append(r)
        for rerun_of, group in sorted(groups.items()):
            done = [r for r in group if r["state"] == "COMPLETE"]
            table.append([
                study.study_name, optimizer_name(study), rerun_of, str(len(group)),
                str(sum(r["state"] == "FAIL" for r in group)),
                _mean_std([row_val_acc(r) for r in done]),
                _mean_std([row_attr(r, "test_acc") for r in done]),
                _mean_std([row_attr(r, "lambda_max") for r in done]),
            ])
    return headers, table
