"""Telling a trial: its attributes in one transaction, the same values as key by key (real SQLite
and, where it runs, PostgreSQL)."""

from __future__ import annotations

import optuna
import pytest
from conftest import postgres_url
from optuna.trial import TrialState

from sassha_tune.study.storage import set_user_attrs
from sassha_tune.study.tell import finish
from sassha_tune.trial.outcome import TrialOutcome

ATTRS = {"val_acc": 0.9325, "history": [{"epoch": 1, "val_acc": 0.5}], "device": "cpu", "lambda_max": None,
         "retry_history": [1, 2], "ms_per_step": 4.25}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_attributes_in_one_transaction_equal_key_by_key(tmp_path, backend):
    # postgres_url skips where PostgreSQL is unreachable
    url = postgres_url() if backend == "postgresql" else f"sqlite:///{tmp_path / 't.db'}"
    name = f"tell-{tmp_path.name}"
    study = optuna.create_study(storage=url, study_name=name, direction="maximize")
    try:
        one, each = study.ask(), study.ask()
        set_user_attrs(study, one, ATTRS)
        for key, value in ATTRS.items():
            each.set_user_attr(key, value)
        stored = {t.number: t.user_attrs for t in study.get_trials()}
        assert stored[one.number] == ATTRS == stored[each.number]
        set_user_attrs(study, one, {"val_acc": 0.5})  # an existing key is updated
        assert study.get_trials()[one.number].user_attrs["val_acc"] == 0.5
    finally:
        optuna.delete_study(study_name=name, storage=url)


def test_a_finished_trial_takes_no_attribute_and_keeps_its_own(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'f.db'}", direction="maximize")
    trial = study.ask()
    frozen = finish(study, trial, TrialOutcome("complete", attrs={"val_acc": 0.75}, values=[0.75]))
    assert frozen.state == TrialState.COMPLETE and frozen.user_attrs == {"val_acc": 0.75}
    with pytest.raises(RuntimeError):  # optuna's UpdateFinishedTrialError: nothing half-written
        set_user_attrs(study, trial, {"val_acc": 0.1, "new": 1})
    assert study.get_trials()[0].user_attrs == {"val_acc": 0.75}
