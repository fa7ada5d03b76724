"""Does flatness predict generalization: the correlation section, summary.json and the verdict.

The studies are real Optuna studies in a temporary SQLite file whose trials are written with
``optuna.trial.create_trial`` + ``study.add_trial``, so that the correlations are known exactly.
The numbers are checked against :mod:`scipy.stats` (an implementation independent of ours).

The scenario of issue 18: ten trials that trained, whose lambda_max says nothing about their gap
(Spearman -0.2), and six near-chance trials (val_acc 0.10-0.12 on 10 classes): untrained
networks, trivially flat (lambda_max ~0.4) and with no gap. Together they make a "significant"
flat-generalizes-better trend (rho +0.66) that disappears once the near-chance trials are left out.
"""

from __future__ import annotations

import json
import re

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from scipy import stats

from sassha_tune.report import run_report
from sassha_tune.report.correlation import kendall_tau, partial_spearman, rank, spearman
from sassha_tune.report.figures import build_figures

optuna.logging.set_verbosity(optuna.logging.WARNING)

LAM_TRAINED = [3.1, 4.5, 5.2, 6.8, 8.0, 9.7, 11.3, 13.9, 17.2, 22.5]
GAP_TRAINED = [0.09, 0.15, 0.06, 0.12, 0.14, 0.05, 0.11, 0.08, 0.13, 0.07]
LAM_CHANCE = [0.31, 0.36, 0.40, 0.45, 0.33, 0.42]
GAP_CHANCE = [-0.01, 0.0, 0.01, -0.005, 0.005, 0.002]


def _attrs(val_acc: float, lam: float, gap: float, k: int) -> dict:
    return {"val_acc": val_acc, "test_acc": val_acc - 0.01 * (k % 3), "train_acc": val_acc + gap,
            "gen_gap_acc": gap, "train_loss": 2.3 - 2.0 * (val_acc + gap) + 0.01 * k,
            "lambda_max": lam, "hessian_trace": 10 * lam + k, "sam_sharpness": 0.01 * lam * (1 + 0.1 * (k % 4)),
            "adaptive_sharpness": 0.02 * lam + 0.001 * ((7 * k) % 5), "num_classes": 10,
            "history": [{"epoch": e, "train_acc": val_acc * e / 3 + gap, "val_acc": val_acc * e / 3,
                         "train_loss": 2.0 / e, "val_loss": 2.1 / e} for e in (1, 2, 3)]}


def _study(url: str, *, chance: bool = True, failed: int = 1) -> optuna.Study:
    study = optuna.create_study(study_name="crafted", storage=url, direction="maximize")
    study.set_user_attr("optimizer", "sassha")
    dist = {"lr": FloatDistribution(1e-4, 1.0, log=True)}
    k = 0
    for lam, gap in zip(LAM_TRAINED, GAP_TRAINED, strict=True):
        acc = 0.6 + 0.03 * k
        study.add_trial(create_trial(value=acc, params={"lr": 10 ** (-3 + 0.2 * k)}, distributions=dist,
                                     user_attrs=_attrs(acc, lam, gap, k)))
        k += 1
    if chance:
        for j, (lam, gap) in enumerate(zip(LAM_CHANCE, GAP_CHANCE, strict=True)):
            acc = 0.10 + 0.004 * j
            study.add_trial(create_trial(value=acc, params={"lr": 10 ** (-3.9 + 0.01 * j)}, distributions=dist,
                                         user_attrs=_attrs(acc, lam, gap, k)))
            k += 1
    for _ in range(failed):
        study.add_trial(create_trial(state=TrialState.FAIL, params={"lr": 0.9}, distributions=dist,
                                     user_attrs={"failure_reason": "diverged"}))
    return study


def _entry(summary: dict, x: str, y: str, method: str = "spearman") -> dict:
    return next(e for e in summary["correlations"] if (e["x"], e["y"], e["method"]) == (x, y, method))


def test_rank_statistics_agree_with_scipy():
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.integers(0, 6, 25).astype(float)  # many ties
        y = x + rng.normal(size=25)
        z = rng.normal(size=25) + 0.5 * y
        np.testing.assert_allclose(rank(x), stats.rankdata(x))
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
        # partial correlation of the ranks, computed by regressing the ranks on z's ranks
        rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
        res = [a - np.polyval(np.polyfit(rz, a, 1), rz) for a in (rx, ry)]
        assert partial_spearman(x, y, z) == pytest.approx(stats.pearsonr(*res).statistic, abs=1e-10)
    # vectorized over rows: the same as one at a time
    xs, ys = rng.normal(size=(7, 12)), rng.normal(size=(7, 12))
    np.testing.assert_allclose(spearman(xs, ys), [stats.spearmanr(a, b).statistic for a, b in zip(xs, ys, strict=True)])
    assert np.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_near_chance_trials_make_a_spurious_correlation_the_report_does_not_report(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'crafted.db'}"
    study = _study(url)
    run_report("crafted", url, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    c = summary["counts"]
    assert (c["trials"], c["complete"], c["trained"], c["near_chance"], c["failed"], c["pruned"]) == (17, 16, 10, 6, 1, 0)

    main = _entry(summary, "lambda_max", "gen_gap_acc")
    assert main["n"] == 10 and main["over"] == "trained"
    assert main["value"] == pytest.approx(stats.spearmanr(LAM_TRAINED, GAP_TRAINED).statistic, abs=1e-12)
    assert main["ci"][0] < 0 < main["ci"][1]
    tau = _entry(summary, "lambda_max", "gen_gap_acc", "kendall")
    assert tau["value"] == pytest.approx(stats.kendalltau(LAM_TRAINED, GAP_TRAINED).statistic, abs=1e-12)
    # every measure against every target, over the same trained trials, equals scipy
    trained = [t for t in study.trials if t.state == TrialState.COMPLETE and t.user_attrs["val_acc"] > 0.15]
    for e in summary["correlations"]:
        if e["method"] != "spearman":
            continue
        x = [t.user_attrs[e["x"]] for t in trained]
        y = [t.user_attrs[e["y"]] for t in trained]
        assert e["n"] == 10
        assert e["value"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12), (e["x"], e["y"])
        assert e["ci"][0] <= e["value"] <= e["ci"][1]

    # with the near-chance trials, the same correlation would look like strong evidence
    full = next(e for e in summary["correlations_all_complete"] if (e["x"], e["y"]) == ("lambda_max", "gen_gap_acc"))
    assert full["n"] == 16
    assert full["value"] == pytest.approx(
        stats.spearmanr(LAM_TRAINED + LAM_CHANCE, GAP_TRAINED + GAP_CHANCE).statistic, abs=1e-12)
    assert full["ci"][0] > 0
    verdict = summary["verdict"]
    assert "interval includes 0" in verdict and "too wide to conclude" in verdict
    assert "6 near-chance trials included" in verdict and "artefact" in verdict

    # the Pareto front holds trained trials only (without the rule, the flat near-chance trials would be on it)
    chance_numbers = {t.number for t in study.trials if t.user_attrs.get("val_acc", 1) <= 0.15}
    assert summary["pareto"] and not set(summary["pareto"]) & chance_numbers
    lam_by_number = {t.number: t.user_attrs.get("lambda_max") for t in trained}
    flattest_trained = min(lam_by_number, key=lam_by_number.get)
    best = max(trained, key=lambda t: t.value).number
    assert {flattest_trained, best} <= set(summary["pareto"])

    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Does flatness predict generalization here?" in md and verdict in md
    assert "10 trials that trained" in md and "6 near chance" in md
    out = capsys.readouterr().out
    assert "verdict: " + verdict in out
    lines = out.splitlines()
    table = lines[1:next(i for i, line in enumerate(lines) if line.startswith("trained trials:"))]
    assert table and all(len(line) <= 80 for line in table)  # the terminal of the tests: 80 columns


def test_without_near_chance_trials_a_real_correlation_is_supported(tmp_path):
    """The same machinery says "supports" when the trained trials do show the relationship."""
    url = f"sqlite:///{tmp_path / 'real.db'}"
    study = optuna.create_study(study_name="crafted", storage=url, direction="maximize")
    dist = {"lr": FloatDistribution(1e-4, 1.0, log=True)}
    for k, lam in enumerate(LAM_TRAINED * 2):
        gap = 0.01 * lam + 0.004 * ((5 * k) % 3)  # rises with lambda_max
        study.add_trial(create_trial(value=0.7, params={"lr": 10 ** (-3 + 0.1 * k)}, distributions=dist,
                                     user_attrs=_attrs(0.7 + 0.001 * k, lam, gap, k)))
    run_report("crafted", url, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    main = _entry(summary, "lambda_max", "gen_gap_acc")
    assert main["n"] == 20 and main["ci"][0] > 0
    assert "The interval excludes 0" in summary["verdict"] and "flatter generalized better" in summary["verdict"]
    assert summary["counts"]["near_chance"] == 0


def test_too_few_trained_trials_say_so(tmp_path):
    url = f"sqlite:///{tmp_path / 'few.db'}"
    study = optuna.create_study(study_name="few", storage=url, direction="maximize")
    dist = {"lr": FloatDistribution(1e-4, 1.0, log=True)}
    for k in range(3):
        study.add_trial(create_trial(value=0.7, params={"lr": 0.01 * (k + 1)}, distributions=dist,
                                     user_attrs=_attrs(0.7, 1.0 + k, 0.1, k)))
    run_report("few", url, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert _entry(summary, "lambda_max", "gen_gap_acc")["value"] is None
    assert summary["verdict"].startswith("Not enough data") and "only 3 trained trials" in summary["verdict"]


def test_figures_draw_near_chance_trials_apart(tmp_path):
    study = _study(f"sqlite:///{tmp_path / 'crafted.db'}")
    figs = build_figures(study)
    gap = figs["gap_vs_lambda_max"].axes[0]
    assert len(gap.collections[0].get_offsets()) == 10  # trained
    assert len(gap.collections[1].get_offsets()) == 6  # near chance, drawn as red x
    assert "10 trained, 6 near chance" in gap.get_title()
    pareto = figs["pareto"].axes[0]
    front_x = list(pareto.lines[0].get_xdata())
    assert front_x and min(front_x) >= min(LAM_TRAINED)  # no near-chance trial on the front
    curves = figs["learning_curves"].axes[0]
    assert len(curves.lines) == 2 * 5  # train and val of the 5 best trained trials
    parallel = figs["parallel_coordinates"].axes[0]
    assert len(parallel.collections[0].get_segments()) == 10  # one line per trained trial
    assert len(parallel.lines) == 3  # the axes: lr, lambda_max, val_acc


def test_report_html_is_self_contained(tmp_path):
    url = f"sqlite:///{tmp_path / 'crafted.db'}"
    _study(url)
    run_report("crafted", url, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert not re.findall(r"<(?:script|link|img|iframe)[^>]*(?:src|href)=", page)  # nothing to fetch
    assert page.count("Plotly.newPlot") >= 8
    for title in ("Generalization gap vs lambda_max", "Pareto front", "Learning curves",
                  "Optimization history (Optuna)", "Intermediate values", "Parameter importances",
                  "Parallel coordinate (Optuna)", "Slice (Optuna)", "Contour (Optuna)",
                  "Does flatness predict generalization here?", "Best trials"):
        assert title in page, title


def test_compare_sharpness_over_trained_trials_and_its_summary(tmp_path):
    from sassha_tune.report import compare_figures, run_compare

    url = f"sqlite:///{tmp_path / 'crafted.db'}"
    study = _study(url)
    run_compare(["crafted"], url, tmp_path / "cmp")
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    (entry,) = summary["sharpness_over_trained"]
    assert entry["trained"] == 10 and entry["near_chance"] == 6
    assert entry["lambda_max"]["median"] == pytest.approx(float(np.median(LAM_TRAINED)))
    assert entry["lambda_max"]["iqr"] == pytest.approx(list(np.percentile(LAM_TRAINED, [25, 75])))
    rho = entry["lambda_max_vs_gap"]
    assert rho["n"] == 10 and rho["value"] == pytest.approx(stats.spearmanr(LAM_TRAINED, GAP_TRAINED).statistic)
    (ranked,) = summary["studies"]
    assert ranked["study"] == "crafted" and ranked["near_chance"] == "6"
    assert "## Sharpness over trained trials" in (tmp_path / "cmp" / "compare.md").read_text()
    figs = compare_figures([study])
    ax = figs["best_vs_trials"].axes[0]
    assert len(ax.lines) == 1 and len(ax.collections) == 1  # one median line, one band
    anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.x0 > 1.0  # the legend is anchored right of the axes, outside them
    gap = figs["gap_vs_lambda_max"].axes[0]
    assert len(gap.collections[0].get_offsets()) == 10  # trained trials only
