"""The typed record of a stored trial (study/records.py): what it reads from an Optuna trial and
how it answers for a trial that stored little."""

from __future__ import annotations

import datetime
import math

import optuna
from optuna.trial import TrialState, create_trial

from sassha_tune.study.budget import outcome, run_equivalents
from sassha_tune.study.records import TrialRecord

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
