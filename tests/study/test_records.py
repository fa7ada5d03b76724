"""The typed record of a stored trial (study/records.py): what it reads from an Optuna trial, how it
answers for a trial that stored little, and that it reads the attributes a real trial writes under
the names of trial/attributes.py."""

from __future__ import annotations

import datetime
import math

import optuna
from conftest import tiny_config
from optuna.trial import TrialState, create_trial

import sassha_tune
from sassha_tune.metrics.chance import acc_near_chance
from sassha_tune.metrics.names import STORED_ATTRS
from sassha_tune.study.budget import outcome, run_equivalents
from sassha_tune.study.records import TrialRecord
from sassha_tune.trial import attributes

LR = optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)


def test_a_record_reads_a_stored_trial():
    start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    trial = create_trial(value=0.5, params={"lr": 0.01}, distributions={"lr": LR},
                         user_attrs={"val_acc": 0.75, "lambda_max": "12.5", "num_classes": 10, "epochs_trained": 2.5,
                                     "history": [{"epoch": 1, "val_acc": 0.7}]})
    trial.datetime_start, trial.datetime_complete = start, start + datetime.timedelta(seconds=90)
    r = TrialRecord.from_trial(trial)
    assert (r.state, dict(r.params), r.values, r.duration_s) == ("COMPLETE", {"lr": 0.01}, [0.5], 90.0)
    assert r.val_acc == 0.75  # the stored attribute, not the objective value
    assert r.metric("lambda_max") == 12.5 and math.isnan(r.metric("test_acc"))
    assert r.history == [{"epoch": 1, "val_acc": 0.7}] and r.epochs_trained == 2.5
    assert r.near_chance is False and not r.is_rerun and r.failure_reason is None
    assert outcome(r) == "completed" and run_equivalents(r, 10) == 0.25


def test_a_record_of_a_trial_that_stored_little():
    pruned = TrialRecord.from_trial(create_trial(state=TrialState.PRUNED, params={}, distributions={},
                                                 user_attrs={"epochs_completed": 3, "failure_reason": "diverged",
                                                             "seed_rerun_of": 4}))
    assert pruned.values is None and math.isnan(pruned.val_acc)
    assert pruned.epochs_trained == 3 and pruned.history == []  # trials stored before epochs_trained
    assert pruned.is_rerun and pruned.rerun_of == 4 and pruned.near_chance is False
    assert outcome(pruned) == "diverged" and run_equivalents(pruned, 0) == 0.0
    bare = TrialRecord(1, "COMPLETE", {}, [0.125], {"num_classes": 10})
    assert bare.val_acc == 0.125  # the first objective value stands in for a missing val_acc
    assert bare.near_chance is None  # but near chance is decided on the stored attribute only
    assert TrialRecord(2, "COMPLETE", {}, None, {"num_classes": 10, "val_acc": 0.12}).near_chance is True


def test_a_trial_run_end_to_end_stores_what_its_record_reads(tmp_path):
    """A real tiny study of two trials (lr 0.1 completes, lr 1e12 diverges in its first epoch): every
    attribute they store is a metric of STORED_ATTRS or named in trial/attributes.py (besides what
    the study stores of the search itself), and the record reads back what the trial wrote."""
    cfg = tiny_config("keys", budget={"n_trials": 2}, optimizer={"enqueue_published": True, "search_space": {
        "params": {"lr": {"type": "float", "low": 1e-3, "high": 1e12, "log": True}},
        "published": [{"lr": 0.1}, {"lr": 1e12}]}})
    lines: list[str] = []
    study = sassha_tune.run_study(cfg, storage=f"sqlite:///{tmp_path / 'keys.db'}", log=lines.append)
    done, diverged = sorted(study.trials, key=lambda t: t.number)
    named = {getattr(attributes, name) for name in attributes.__all__}
    searched = {"optimizer_hparams", "prior"}  # the trial's optimizer arguments; enqueued as the space's prior
    for trial in (done, diverged):
        assert set(trial.user_attrs) <= set(STORED_ATTRS) | named | searched, trial.user_attrs

    assert done.state == TrialState.COMPLETE
    assert {attributes.HISTORY, attributes.EPOCHS_TRAINED, attributes.EPOCHS_COMPLETED, attributes.NUM_CLASSES,
            attributes.DEVICE, attributes.VAL_ACC, attributes.SEED_ATTR} <= set(done.user_attrs)
    assert not {attributes.FAILURE_REASON, attributes.PRUNE_REASON, attributes.SEED_RERUN_ATTR} & set(done.user_attrs)
    r = TrialRecord.from_trial(done)
    assert [h["epoch"] for h in r.history] == [1] and r.epochs_trained == 1.0 and r.failure_reason is None
    assert r.val_acc == r.history[-1]["val_acc"] == done.user_attrs["val_acc"] and r.values == done.values
    assert r.near_chance is acc_near_chance(r.val_acc, 10)  # decided: num_classes is stored
    assert outcome(r) == ("near_chance" if r.near_chance else "completed")

    assert diverged.state == TrialState.PRUNED  # told PRUNED so that the sampler sees it, its reason kept
    r = TrialRecord.from_trial(diverged)
    assert r.failure_reason == attributes.DIVERGED and r.prune_reason is None and r.near_chance is False
    assert outcome(r) == "diverged" and 0 < r.epochs_trained <= 1
    assert f"trial {diverged.number} PRUNED (diverged in epoch 1)" in lines  # the loop reads what it wrote
