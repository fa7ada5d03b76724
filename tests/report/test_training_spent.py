"""Where a study's training went (issue 24): the run-equivalents by how trials ended and the anytime
curve, in status, report.md, summary.json, report.html and the figure, on a crafted SQLite study
whose every number is known."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.report import run_report
from sassha_tune.report.curves import training_curve
from sassha_tune.report.rows import load_rows
from sassha_tune.study.budget import spent_by_outcome
from sassha_tune.study.records import TrialRecord
from sassha_tune.study.views import spent_line, study_detail

optuna.logging.set_verbosity(optuna.logging.WARNING)

LR = optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)
# (state, user attributes, val_acc as value) of five trials of a 10-epoch study, 10 classes
TRIALS = [
    (TrialState.COMPLETE, {"epochs_trained": 10, "val_acc": 0.80}, 0.80),
    (TrialState.PRUNED, {"epochs_trained": 1, "epochs_completed": 1, "val_acc": 0.30}, None),
    (TrialState.PRUNED, {"epochs_trained": 0.5, "epochs_completed": 0, "failure_reason": "diverged"}, None),
    (TrialState.COMPLETE, {"epochs_trained": 10, "val_acc": 0.12}, 0.12),  # near chance: 0.12 <= 0.15
    (TrialState.PRUNED, {"epochs_trained": 2, "epochs_completed": 2, "val_acc": 0.10,
                         "prune_reason": "near_chance"}, None),
    (TrialState.COMPLETE, {"epochs_completed": 10, "val_acc": 0.90}, 0.90),  # an older trial: no epochs_trained
    (TrialState.FAIL, {"epochs_trained": 3.2, "failure_reason": "out_of_memory"}, None),
]


@pytest.fixture
def study(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    s = optuna.create_study(study_name="spent", storage=url, direction="maximize")
    s.set_user_attr("config", {"task": {"epochs": 10}})
    s.set_user_attr("optimizer", "sassha")
    for i, (state, attrs, value) in enumerate(TRIALS):
        s.add_trial(create_trial(state=state, value=value, params={"lr": 0.01 * (i + 1)}, distributions={"lr": LR},
                                 user_attrs={**attrs, "num_classes": 10}))
    return s, url


def test_the_training_is_split_by_how_trials_ended(study):
    s, _ = study
    spent = spent_by_outcome((TrialRecord.from_trial(t) for t in s.trials), 10)
    assert list(spent) == ["completed", "near_chance", "pruned", "diverged", "failed"]
    assert {k: v["trials"] for k, v in spent.items()} == {"completed": 2, "near_chance": 2, "pruned": 1,
                                                          "diverged": 1, "failed": 1}
    assert {k: v["run_eq"] for k, v in spent.items()} == pytest.approx(
        {"completed": 2.0, "near_chance": 1.2, "pruned": 0.1, "diverged": 0.05, "failed": 0.32})
    assert spent_line(study_detail(s)["spent"]) == (
        "training spent: 3.7 run-equivalents (completed 2.0, near chance 1.2, pruned 0.1, diverged 0.1, failed 0.3)")


def test_the_anytime_curve_follows_the_selected_configuration(study):
    s, _ = study
    curve = training_curve(load_rows(s), 10)
    assert curve["cost"] == pytest.approx([1.0, 1.1, 1.15, 2.15, 2.35, 3.35, 3.67])
    assert curve["outcome"] == ["completed", "pruned", "diverged", "near_chance", "near_chance", "completed", "failed"]
    assert curve["best"] == pytest.approx([0.8, 0.8, 0.8, 0.8, 0.8, 0.9, 0.9])  # pruned ones never select


def test_report_and_status_say_where_the_training_went(study, tmp_path):
    s, url = study
    run_report("spent", url, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    section = md.split("## Where the training went")[1].split("\n## ")[0]
    assert "**3.67 run-equivalents**" in section and "found after 3.35 of them" in section
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in section.splitlines() if line.startswith("| ") and "ended" not in line}
    assert rows["near chance"] == ["2", "1.20", "33%"] and rows["diverged"] == ["1", "0.05", "1%"]
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())["training_spent"]
    assert summary["total_run_eq"] == pytest.approx(3.67) and summary["best_found_at_run_eq"] == pytest.approx(3.35)
    assert (tmp_path / "rep" / "best_vs_training.png").stat().st_size > 0
    assert "Best so far vs training spent" in (tmp_path / "rep" / "report.html").read_text()
    result = CliRunner().invoke(app, ["status", "spent", "--storage", url])
    assert result.exit_code == 0, result.output
    assert "training spent: 3.7 run-equivalents (completed 2.0, near chance 1.2" in result.output
