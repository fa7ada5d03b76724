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

from sassha_tune.study.records import TrialRecord

from .rows import (
    SEED_RERUN_ATTR,
    SEED_STUDY_SUFFIX,
    load_rows,
    optimizer_name,
    read_storage,
    read_study,
)

__all__ = ["mean_interval", "rerun_table", "t_quantile"]


def _seed_rerun_rows(study: optuna.Study, rows: Sequence[TrialRecord],
                     storage: str | optuna.storages.BaseStorage | None,
                     names_in_storage: set[str]) -> list[TrialRecord]:
    """Re-run rows for ``study`` (``rows``: its rows): its trials marked ``seed_rerun_of`` and the
    trials of ``<name>-seeds``."""
    rows = [r for r in rows if r.is_rerun]
    companion = study.study_name + SEED_STUDY_SUFFIX
    if storage is not None and companion in names_in_storage:
        backend = read_storage(storage)
        rows += load_rows(read_study(companion, backend, shown_as=storage))
    return rows


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _mean_std(values: Sequence[float]) -> str:
    finite = _finite(values)
    if not finite:
        return "-"
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return f"{np.mean(finite):.4g} ± {std:.2g}"


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``p`` > 0.5) of Student's t distribution with ``df`` degrees of
    freedom: its density integrated from 0 (Simpson's rule, 4,000 intervals) and bisected, to
    about 1e-9; scipy is not a dependency."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        x = np.linspace(0.0, t, 4001)
        y = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
        h = t / 4000
        return 0.5 + h / 3 * float(y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` confidence interval of the mean of ``values`` (the finite ones) by Student's t
    (seeds as independent draws); None with fewer than two."""
    finite = _finite(values)
    if len(finite) < 2:
        return None
    mean, sem = float(np.mean(finite)), float(np.std(finite, ddof=1)) / math.sqrt(len(finite))
    half = t_quantile(0.5 + level / 2, len(finite) - 1) * sem
    return mean - half, mean + half


def _interval(values: Sequence[float]) -> str:
    ci = mean_interval(values)
    return "-" if ci is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def rerun_table(studies: Sequence[optuna.Study], storage: Any, names_in_storage: set[str],
                rows: Sequence[Sequence[TrialRecord]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the re-run table: per study and re-run group (``seed_rerun_of``, or
    ``best`` for companion-study trials without it) the number of seeds, the failed ones, the
    mean ± sample std of val_acc, test_acc and lambda_max over the complete ones, and the 95 %
    confidence interval (Student's t) of the mean test_acc and lambda_max. ``rows``: each study's
    rows, when already read."""
    headers = ["study", "optimizer", "rerun_of", "seeds", "failed", "val_acc", "test_acc", "test_acc 95% CI",
               "lambda_max", "lambda_max 95% CI"]
    table = []
    for i, study in enumerate(studies):
        rows_i = load_rows(study) if rows is None else rows[i]
        rows_i = _seed_rerun_rows(study, rows_i, storage, names_in_storage)
        if not rows_i:
            continue
        groups: dict[str, list[TrialRecord]] = {}
        for r in rows_i:
            groups.setdefault(str(r.user_attrs.get(SEED_RERUN_ATTR, "best")), []).append(r)
        for rerun_of, group in sorted(groups.items()):
            done = [r for r in group if r.state == "COMPLETE"]
            test = [r.metric("test_acc") for r in done]
            sharp = [r.metric("lambda_max") for r in done]
            table.append([
                study.study_name, optimizer_name(study), rerun_of, str(len(group)),
                str(sum(r.state == "FAIL" for r in group)),
                _mean_std([r.val_acc for r in done]),
                _mean_std(test), _interval(test), _mean_std(sharp), _interval(sharp),
            ])
    return headers, table
