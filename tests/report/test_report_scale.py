"""`report` at scale: the bootstrap intervals are those of scipy over the same resamples, computed
without n^2 memory per resample (Kendall's tau included, at any n), and a study of 1,500 trials
reports in seconds, Optuna's superlinear analyses drawn over seeded samples that the report names.
(benchmarks/report_scale.py measures 100 / 1,000 / 10,000 trials: docs/report-scale.md.)"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import tracemalloc

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from scipy import stats

from sassha_tune.report import run_report
from sassha_tune.report.correlation import BOOT_SEED, LEVEL, N_BOOT, correlate, kendall_tau
from sassha_tune.report.figures import IMPORTANCE_TRIALS
from sassha_tune.report.html import CONTOUR_TRIALS, OPTUNA_PLOT_TRIALS
from sassha_tune.study.records import TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _rows(columns: dict[str, np.ndarray]) -> list[TrialRecord]:
    n = len(next(iter(columns.values())))
    return [TrialRecord(i, "COMPLETE", {}, [0.5], {k: float(v[i]) for k, v in columns.items()}) for i in range(n)]


def _percentiles(values: list[float]) -> list[float]:
    finite = np.array([v for v in values if math.isfinite(v)])
    tail = (1 - LEVEL) / 2 * 100
    return list(np.percentile(finite, [tail, 100 - tail]))


def test_bootstrap_intervals_are_scipys_over_the_same_resamples_in_bounded_memory():
    """600 trials with many ties: Kendall's tau-b, Spearman's rho and the partial rho and their
    2000-resample intervals equal scipy's statistics over the resamples the seed draws, and the
    bootstrap holds a few MB (a sign matrix per resample would be 2000 x 600^2 entries)."""
    rng = np.random.default_rng(5)
    n = 600
    x = rng.integers(0, 40, n).astype(float)
    y = (0.3 * x + rng.normal(size=n)).round(1)
    z = (0.5 * y + rng.normal(size=n)).round(1)
    rows = _rows({"lambda_max": x, "gen_gap_acc": y, "train_loss": z})
    tracemalloc.start()
    try:
        tau = correlate("lambda_max", "gen_gap_acc", "kendall", rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rho = correlate("lambda_max", "gen_gap_acc", "spearman", rows)
    partial = correlate("lambda_max", "gen_gap_acc", "partial_spearman", rows)
    assert peak < 64 * 2**20, peak / 2**20

    resamples = np.random.default_rng(BOOT_SEED).integers(0, n, size=(N_BOOT, n))
    taus, rhos, partials = [], [], []
    for i in resamples:
        taus.append(stats.kendalltau(x[i], y[i]).statistic)
        rxy, rxz, ryz = (stats.spearmanr(a[i], b[i]).statistic for a, b in ((x, y), (x, z), (y, z)))
        rhos.append(rxy)
        partials.append((rxy - rxz * ryz) / math.sqrt((1 - rxz**2) * (1 - ryz**2)))
    assert tau["value"] == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert tau["ci"] == pytest.approx(_percentiles(taus), abs=1e-12)
    assert rho["value"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert rho["ci"] == pytest.approx(_percentiles(rhos), abs=1e-12)
    assert partial["ci"] == pytest.approx(_percentiles(partials), abs=1e-10)


def test_kendall_tau_of_many_trials_with_ties_is_scipys():
    rng = np.random.default_rng(11)
    for n, levels in ((5000, 7), (3001, 300), (257, 2)):
        x = rng.integers(0, levels, n).astype(float)
        y = np.where(rng.random(n) < 0.5, x, rng.integers(0, levels, n)).astype(float)
        assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
        assert kendall_tau(x, -y) == pytest.approx(stats.kendalltau(x, -y).statistic, abs=1e-12)
    assert math.isnan(kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_entries_over_different_trials_each_use_their_own():
    """Trials missing test_acc or train_loss leave different trials for different entries: each
    entry is scipy's over the trials that have its values (its own pass of the resamples)."""
    from sassha_tune.report.correlation import correlation_entries

    rng = np.random.default_rng(2)
    n = 60
    cols = {k: rng.normal(size=n) for k in ("lambda_max", "hessian_trace", "sam_sharpness", "adaptive_sharpness",
                                             "gen_gap_acc", "val_acc", "test_acc", "train_loss")}
    cols["test_acc"][:7] = np.nan  # stored as missing
    cols["train_loss"][-11:] = np.nan
    rows = [dataclasses.replace(row, user_attrs={k: v for k, v in row.user_attrs.items() if math.isfinite(v)})
            for row in _rows(cols)]
    for e in correlation_entries(rows):
        keys = [e["x"], e["y"]] + ([e["given"]] if "given" in e else [])
        kept = np.logical_and.reduce([np.isfinite(cols[k]) for k in keys])
        assert e["n"] == kept.sum()
        x, y = cols[e["x"]][kept], cols[e["y"]][kept]
        if e["method"] == "kendall":
            assert e["value"] == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
        elif e["method"] == "spearman":
            assert e["value"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert e["ci"] is not None and e["ci"][0] <= e["value"] <= e["ci"][1]


SPACE = {"lr": FloatDistribution(1e-3, 1.0, log=True), "rho": FloatDistribution(0.01, 1.0, log=True),
         "lazy_hessian": IntDistribution(1, 100, log=True)}


def _big_study(storage: optuna.storages.BaseStorage, n: int) -> None:
    """``n`` finished trials with the attributes a trained trial stores (numbers drawn)."""
    rng = np.random.default_rng(0)
    study = optuna.create_study(study_name="big", storage=storage, direction="maximize")
    study.set_user_attr("optimizer", "sassha")
    trials = []
    for k in range(n):
        params = {"lr": float(10 ** rng.uniform(-3, 0)), "rho": float(10 ** rng.uniform(-2, 0)),
                  "lazy_hessian": int(rng.integers(1, 101))}
        if k % 10 == 9:
            trials.append(create_trial(state=TrialState.FAIL, params=params, distributions=SPACE,
                                       user_attrs={"failure_reason": "diverged", "num_classes": 10}))
            continue
        val, lam = float(rng.uniform(0.3, 0.9)), float(np.exp(rng.normal()))
        history = [{"epoch": e, "val_acc": val * e / 5, "train_acc": val * e / 5 + 0.02,
                    "val_loss": 2.0 / e, "train_loss": 1.9 / e} for e in range(1, 6)]
        attrs = {"val_acc": val, "test_acc": val - 0.01, "train_acc": val + 0.05, "gen_gap_acc": float(rng.normal(0.05, 0.02)),
                 "train_loss": float(rng.uniform(0.1, 1.0)), "lambda_max": lam, "hessian_trace": lam * 5,
                 "sam_sharpness": lam / 100, "adaptive_sharpness": lam / 300, "num_classes": 10,
                 "train_seconds": 3.0, "history": history}
        trials.append(create_trial(value=val, params=params, distributions=SPACE, user_attrs=attrs,
                                   intermediate_values={e: val * e / 5 for e in range(1, 6)}))
    study.add_trials(trials)


@pytest.mark.slow
def test_a_study_of_1500_trials_reports_in_seconds_and_says_what_it_sampled(tmp_path):
    """fANOVA and Optuna's contour grow faster than the trials (1,000 trials: ~25 s per fANOVA and
    a 100 MB report.html before): they run over seeded samples, and the report says so."""
    storage = optuna.storages.InMemoryStorage()
    _big_study(storage, 1500)
    t0 = time.perf_counter()
    run_report("big", storage, tmp_path)
    seconds = time.perf_counter() - t0
    summary = json.loads((tmp_path / "summary.json").read_text())
    kendall = [e for e in summary["correlations"] if e["method"] == "kendall"]
    assert kendall and all(e["n"] == 1350 and e["ci"] is not None for e in kendall)  # intervals at any n
    page = (tmp_path / "report.html").read_text()
    assert f"over a random {IMPORTANCE_TRIALS} of the 1350 complete trials" in page
    assert (f"Of the 1500 finished trials, Optuna&#x27;s plots over a random {OPTUNA_PLOT_TRIALS} and the "
            f"contour over a random {CONTOUR_TRIALS} are drawn") in page
    assert len(page) < 25 * 2**20  # the contour over every trial alone was over 100 MB
    assert seconds < 120, seconds  # minutes before (2 cores)
