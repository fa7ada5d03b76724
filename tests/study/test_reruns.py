"""``sassha-tune rerun`` (issue 27): the chosen configuration over training seeds as trials of the
companion study ``<study>-seeds``, run by the study loop: each trains with its own seed (the
values ``train --seed`` gives), a second call runs only the seeds missing, a lost re-run is retried
with its seed, ``report`` and ``compare`` show mean, spread and a 95 % interval; bad input is one
line, exit 2, nothing stored."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import yaml
from conftest import cli_ok, invoke_cli, one_line_exit_2, tiny_config
from optuna.trial import TrialState

from sassha_tune.report.reruns import mean_interval, t_quantile

pytestmark = pytest.mark.slow

CFG = tiny_config("rr", study={"heartbeat_interval": 0.5, "stale_after": 2.5}, budget={"n_trials": 2},
                  task={"model_options": {"hidden": [16]}, "epochs": 2, "max_steps_per_epoch": 4},
                  metrics={"sharpness": True, "subset_size": 64,
                           "budget": {"lambda_max_iters": 3, "trace_probes": 2, "sam_steps": 1}})
URL = "sqlite:///sassha-tune.db"


def _study(tmp_path, monkeypatch) -> optuna.Study:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rr.yaml").write_text(yaml.safe_dump(CFG))
    cli_ok("run", "rr.yaml")
    return optuna.load_study(study_name="rr", storage=URL)


def _seeds(name: str = "rr-seeds") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=URL).get_trials(deepcopy=False)


def test_rerun_trains_each_seed_as_train_does_and_a_second_call_runs_only_the_missing(tmp_path, monkeypatch):
    study = _study(tmp_path, monkeypatch)
    best = study.best_trial
    ran = cli_ok("rerun", "rr", "--seeds", "1,2")
    assert f"re-runs of trial {best.number} of 'rr' (val_acc={best.value:.4g}) in 'rr-seeds': seeds 1, 2 enqueued" \
        in ran.output
    trials = _seeds()
    assert [(t.state, t.user_attrs["seed"], t.user_attrs["seed_rerun_of"]) for t in trials] == [
        (TrialState.COMPLETE, 1, best.number), (TrialState.COMPLETE, 2, best.number)]
    assert all(t.params == best.params for t in trials)
    assert all(t.user_attrs["epochs_completed"] == 2 for t in trials)  # no pruner, no chance guard
    companion = optuna.load_study(study_name="rr-seeds", storage=URL)
    assert companion.user_attrs["rerun_of_study"] == "rr"
    assert companion.user_attrs["config"]["task"] == study.user_attrs["config"]["task"]

    # each re-run is what `train --seed` gives for the exported configuration (same machine, same run)
    cli_ok("export", "rr", "--out", "best.yaml")
    for t in trials:
        cli_ok("train", "best.yaml", "--seed", str(t.user_attrs["seed"]), "--metrics-out", "m.json")
        trained = json.loads((tmp_path / "m.json").read_text())
        for key in ("val_acc", "test_acc", "train_loss", "lambda_max"):
            assert t.user_attrs[key] == trained[key], key
    assert trials[0].user_attrs["train_loss"] != trials[1].user_attrs["train_loss"]

    again = cli_ok("rerun", "rr", "--seeds", "1,2,3")
    assert "seeds 3 enqueued; 1, 2 there already" in again.output
    assert [t.user_attrs["seed"] for t in _seeds()] == [1, 2, 3]
    assert "all enqueued before" in cli_ok("rerun", "rr", "--seeds", "2,3").output
    assert len(_seeds()) == 3

    # another trial's re-runs join the same companion, grouped by seed_rerun_of
    other = next(t for t in study.trials if t.number != best.number)
    cli_ok("rerun", "rr", "--seeds", "1", "--trial", str(other.number))
    assert [t.user_attrs["seed_rerun_of"] for t in _seeds()] == [best.number] * 3 + [other.number]

    # report and compare: mean ± std and the 95 % interval of test_acc and lambda_max over the seeds
    cli_ok("report", "rr", "--out", "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| test_acc 95% CI " in text and "| lambda_max 95% CI " in text
    row = next(line for line in text.splitlines() if line.startswith("| rr ") and f"| {best.number} " in line)
    tests = [t.user_attrs["test_acc"] for t in _seeds()[:3]]
    lo, hi = mean_interval(tests)
    assert f"[{lo:.4g}, {hi:.4g}]" in row and "| 3 " in row
    (tmp_path / "rr2.yaml").write_text(yaml.safe_dump({**CFG, "study": {**CFG["study"], "name": "rr2"}}))
    cli_ok("run", "rr2.yaml")
    cli_ok("compare", "rr", "rr2", "--out", "cmp")
    assert f"[{lo:.4g}, {hi:.4g}]" in (tmp_path / "cmp" / "compare.md").read_text()


def test_a_lost_rerun_is_retried_with_its_seed(tmp_path, monkeypatch):
    _study(tmp_path, monkeypatch)
    companion_name = "rr-seeds"
    cli_ok("rerun", "rr", "--seeds", "5")
    # a second seed whose process died: asked by plain Optuna, never beating, never told
    companion = optuna.load_study(study_name=companion_name, storage=URL)
    best = _seeds()[0].user_attrs["seed_rerun_of"]
    companion.enqueue_trial(_seeds()[0].params, user_attrs={"seed": 6, "seed_rerun_of": best, "rerun_of_study": "rr"})
    config = dict(companion.user_attrs["config"])
    config["budget"] = {**config["budget"], "n_trials": 2}
    companion.set_user_attr("config", config)
    dead = companion.ask()
    assert dead.user_attrs["seed"] == 6
    ran = cli_ok("rerun", "rr", "--seeds", "5,6")  # seed 6 is running: nothing enqueued; it goes stale, is retried
    assert "all enqueued before" in ran.output and f"trial {dead.number} lost" in ran.output
    trials = _seeds()
    assert trials[dead.number].state == TrialState.FAIL and trials[dead.number].user_attrs["failure_reason"] == "lost"
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["seed"] == 6 and retry.user_attrs["seed_rerun_of"] == best
    assert retry.user_attrs["train_loss"] != trials[0].user_attrs["train_loss"]  # seed 6, not the config's or 5's


def test_a_companion_stored_by_plain_optuna_is_adopted(tmp_path, monkeypatch):
    """benchmarks/reproduce stored its re-runs with plain Optuna before `rerun` existed."""
    study = _study(tmp_path, monkeypatch)
    best = study.best_trial
    old = optuna.create_study(study_name="rr-seeds", storage=URL, direction="maximize")
    old.set_user_attr("rerun_of_study", "rr")
    old.add_trial(optuna.trial.create_trial(params=best.params, distributions=best.distributions, value=0.5,
                                            user_attrs={"seed": 1, "seed_rerun_of": best.number, "test_acc": 0.5}))
    ran = cli_ok("rerun", "rr", "--seeds", "1,2")
    assert "adopted study 'rr-seeds'" in ran.output and "seeds 2 enqueued; 1 there already" in ran.output
    assert [t.user_attrs["seed"] for t in _seeds()] == [1, 2] and _seeds()[1].state == TrialState.COMPLETE


def test_bad_rerun_inputs_are_one_line_and_store_nothing(tmp_path, monkeypatch):
    study = _study(tmp_path, monkeypatch)
    for args, says in [
        (["--seeds", "1,x"], "--seeds: expected comma-separated seeds"),
        (["--seeds", "1,1"], "--seeds: seed 1 listed twice"),
        (["--seeds", ""], "--seeds: expected"),
        (["--seeds", "-1"], "--seeds: expected comma-separated seeds"),
        (["--seeds", "1", "--trial", "99"], "study 'rr' has no trial 99"),
        (["--seeds", "1", "--trial", "-1"], "--trial"),
        (["--seeds", "1", "--device", "cuda:x"], "--device"),
    ]:
        assert says in one_line_exit_2(invoke_cli("rerun", "rr", *args)), args
    assert "study 'nope' not found" in one_line_exit_2(invoke_cli("rerun", "nope", "--seeds", "1"))
    assert optuna.get_all_study_names(URL) == ["rr"]
    # a study of re-runs is not re-run itself; a trial that is not COMPLETE is refused
    cli_ok("rerun", "rr", "--seeds", "1")
    assert "holds re-runs itself" in one_line_exit_2(invoke_cli("rerun", "rr-seeds", "--seeds", "2"))
    pruned = study.ask()
    study.tell(pruned, state=TrialState.PRUNED)
    assert "is PRUNED, not COMPLETE" in one_line_exit_2(invoke_cli("rerun", "rr", "--seeds", "2", "--trial", str(pruned.number)))
    assert len(_seeds()) == 1


def test_the_interval_is_students_t():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 30, 200):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)
    values = [0.91, 0.93, 0.925, 0.94]
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 4, scale=stats.sem(values))
    assert mean_interval(values) == pytest.approx((lo, hi), rel=1e-9)
    assert mean_interval([0.9]) is None and mean_interval([0.9, math.nan]) is None
