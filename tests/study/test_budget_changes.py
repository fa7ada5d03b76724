"""Budget changes say what they do (issue 25), on real SQLite studies and through the real CLI:
``--n-trials`` below the trials already counted is refused with one line and nothing changed,
``+N`` means N more than the study's budget, and running the config again never lowers a budget
that ``--n-trials`` raised (the larger is kept, with a line)."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
import yaml
from conftest import tiny_config
from typer.testing import CliRunner

import sassha_tune
from sassha_tune.app.cli import app
from sassha_tune.config import load_config
from sassha_tune.errors import UserError
from sassha_tune.study.budget import budget_used
from sassha_tune.study.create import budget_change, create_or_continue, set_budget
from sassha_tune.study.storage import open_storage

CFG = tiny_config("budget", budget={"n_trials": 3})


def _config_file(tmp_path, n_trials: int = 3):
    d = yaml.safe_load(yaml.safe_dump(CFG))
    d["budget"]["n_trials"] = n_trials
    p = tmp_path / "budget.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _study_with_counted(tmp_path, counted: int, n_trials: int = 3) -> tuple[str, optuna.Study]:
    """A stored study of budget ``n_trials`` with ``counted`` trials that count toward it (told by
    plain Optuna), and some that do not: a waiting (enqueued) trial and a lost one."""
    url = f"sqlite:///{tmp_path}/b.db"
    study = create_or_continue(load_config(_config_file(tmp_path, n_trials)), url, log=lambda _: None)
    for _ in range(counted):
        study.tell(study.ask(), 0.5)
    lost = study.ask()
    lost.set_user_attr("failure_reason", "lost")
    study.tell(lost, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial({"lr": 0.1})
    assert budget_used(study.get_trials()) == counted
    return url, study


def _stored(url: str) -> tuple[dict, dict]:
    study = optuna.load_study(study_name="budget", storage=open_storage(url))
    return study.user_attrs["config"], study.user_attrs["search_space"]


def test_budget_change_parses_totals_and_more():
    assert budget_change(5) == budget_change("5") and budget_change("5").total(300) == 5
    plus = budget_change(" +2 ", "--n-trials")
    assert plus.more and plus.total(300) == 302 and plus.given == "+2" and plus.option == "--n-trials"
    for bad in (0, -3, True, 2.5, "", "+0", "0", "two", "2+", "+-2", None):
        with pytest.raises(UserError, match=r"^n_trials: expected a total number of trials >= 1, or \+N"):
            budget_change(bad)


def test_set_budget_below_the_counted_trials_is_refused_and_plus_n_adds(tmp_path):
    url, study = _study_with_counted(tmp_path, counted=3)
    before = _stored(url)
    with pytest.raises(UserError) as info:
        set_budget(study, 2, log=lambda _: None)
    assert str(info.value) == ("n_trials 2: below the 3 trials study 'budget' has already counted toward its "
                               "budget of 3; expected a total of at least 3, or +N for N more than 3")
    assert _stored(url) == before  # nothing changed
    lines: list[str] = []
    assert set_budget(study, "+2", log=lines.append) == 5
    assert _stored(url)[0]["budget"]["n_trials"] == 5
    assert lines == ["budget of study 'budget': 3 -> 5 trials (n_trials +2; 3 counted so far)"]
    assert set_budget(study, 3, log=lines.append) == 3  # down to the counted trials: allowed
    assert _stored(url)[0]["budget"]["n_trials"] == 3 and len(lines) == 2


def test_a_config_run_again_keeps_a_larger_stored_budget_and_says_so(tmp_path):
    url, study = _study_with_counted(tmp_path, counted=1)
    set_budget(study, 11, log=lambda _: None)  # resume --n-trials 11
    lines: list[str] = []
    create_or_continue(load_config(_config_file(tmp_path, 8)), url, log=lines.append)  # the file says 8
    assert _stored(url)[0]["budget"]["n_trials"] == 11
    assert "study 'budget' keeps its budget of 11 trials (the config says 8; --n-trials 8 lowers it)" in lines
    lines.clear()
    create_or_continue(load_config(_config_file(tmp_path, 12)), url, log=lines.append)  # a larger file raises it
    assert _stored(url)[0]["budget"]["n_trials"] == 12
    assert "budget of study 'budget': 11 -> 12 trials (from the config)" in lines
    # an explicit budget lowers it, down to the trials counted, and no further (nothing written)
    create_or_continue(load_config(_config_file(tmp_path, 8)), url, budget=budget_change(2), log=lines.append)
    assert _stored(url)[0]["budget"]["n_trials"] == 2
    create_or_continue(load_config(_config_file(tmp_path, 8)), url, budget=budget_change("+3"), log=lines.append)
    assert _stored(url)[0]["budget"]["n_trials"] == 5
    study.tell(study.ask(), 0.5)
    before = _stored(url)
    with pytest.raises(UserError, match=r"^n_trials 1: below the 2 trials study 'budget' has already counted"):
        create_or_continue(load_config(_config_file(tmp_path, 8)), url, budget=budget_change(1), log=lines.append)
    assert _stored(url) == before


def test_a_new_study_with_plus_n_gets_the_configs_budget_plus_n(tmp_path):
    url = f"sqlite:///{tmp_path}/n.db"
    create_or_continue(load_config(_config_file(tmp_path, 3)), url, budget=budget_change("+2"), log=lambda _: None)
    assert _stored(url)[0]["budget"]["n_trials"] == 5


def test_run_study_below_the_counted_trials_is_refused_before_anything_changes(tmp_path):
    url, _ = _study_with_counted(tmp_path, counted=3)
    before = _stored(url)
    with pytest.raises(UserError, match=r"^n_trials 2: below the 3 trials"):
        sassha_tune.run_study(_config_file(tmp_path, 3), storage=url, n_trials=2, log=lambda _: None)
    with pytest.raises(UserError, match=r"^n_trials 1: below the 3 trials"):
        sassha_tune.resume_study("budget", storage=url, n_trials=1, log=lambda _: None)
    assert _stored(url) == before


def _cli(args: list[str]):
    return CliRunner(env={"OMP_NUM_THREADS": "1"}).invoke(app, [str(a) for a in args])


def test_cli_resume_refuses_a_total_below_the_counted_trials_and_plus_n_means_more(tmp_path):
    url, _ = _study_with_counted(tmp_path, counted=3)
    before = _stored(url)
    refused = _cli(["resume", "budget", "--storage", url, "--n-trials", "2"])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr == ("error: --n-trials 2: below the 3 trials study 'budget' has already counted toward "
                              "its budget of 3; expected a total of at least 3, or +N for N more than 3\n")
    assert _stored(url) == before
    bad = _cli(["resume", "budget", "--storage", url, "--n-trials", "+0"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --n-trials: expected") and bad.stderr.count("\n") == 1
    # the case: +N was read as N (a budget of 2 under 300 trials); now it is N more
    ran = _cli(["resume", "budget", "--storage", url, "--n-trials", "+1"])
    assert ran.exit_code == 0, ran.output
    assert "budget of study 'budget': 3 -> 4 trials (--n-trials +1; 3 counted so far)" in ran.output
    study = optuna.load_study(study_name="budget", storage=url)
    assert study.user_attrs["config"]["budget"]["n_trials"] == 4 and budget_used(study.trials) == 4
    assert "budget reached (4/4 trials)" in ran.output


def test_cli_run_again_after_a_raised_budget_keeps_it(tmp_path):
    """The issue's other case: `run config` after `resume --n-trials 5` set the budget back to the
    file's (here 3): the stored 5 is kept and the line says so."""
    url, study = _study_with_counted(tmp_path, counted=3)
    set_budget(study, 5, log=lambda _: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ran = subprocess.run([sys.executable, "-m", "sassha_tune.app.cli", "run", str(_config_file(tmp_path, 3)),
                          "--storage", url, "--create-only"], capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert "study 'budget' keeps its budget of 5 trials (the config says 3; --n-trials 3 lowers it)" in ran.stdout
    assert _stored(url)[0]["budget"]["n_trials"] == 5
