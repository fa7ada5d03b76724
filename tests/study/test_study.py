"""Study mechanics on a real SQLite file: storage URLs, reconciliation of lost trials, budget,
refusing a changed search space, and sampler seeding across resumes."""

from __future__ import annotations

import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from sassha_tune.config import load_config
from sassha_tune.config.spaces import load_space, suggest
from sassha_tune.errors import StorageError, UserError
from sassha_tune.study.budget import budget_used
from sassha_tune.study.create import create_or_continue, set_budget
from sassha_tune.study.liveness import HEARTBEAT_KEY, reconcile
from sassha_tune.study.loop import run_trials, sampler_for
from sassha_tune.study.samplers import trial_seed
from sassha_tune.study.storage import mask_url, open_storage, study_storage, trial_id, with_retry

CFG = {
    "study": {"name": "unit", "heartbeat_interval": 1, "stale_after": 2},
    "budget": {"n_trials": 4},
    "task": {"dataset": "mnist1d", "model": "mlp", "epochs": 1},
    "optimizer": {"name": "sassha"},
}


def _cfg(tmp_path, **changes):
    d = yaml.safe_load(yaml.safe_dump(CFG))
    for dotted, value in changes.items():
        node = d
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    return load_config(p)


def _silent(_msg: str) -> None:
    pass


def test_mask_url_hides_password():
    assert "hunter2" not in mask_url("postgresql+psycopg://bob:hunter2@db:5432/x")
    assert "***" in mask_url("postgresql+psycopg://bob:hunter2@db:5432/x")
    assert mask_url("sqlite:///a.db") == "sqlite:///a.db"


def test_bad_storage_urls(tmp_path):
    with pytest.raises(StorageError, match="not a database URL"):
        open_storage("not a url")
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path}/missing/dir/x.db")
    with pytest.raises(StorageError) as info:
        open_storage("postgresql+psycopg://bob:hunter2@127.0.0.1:1/x")
    assert "hunter2" not in str(info.value)


def test_with_retry_backs_off_on_locked():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("UPDATE", {}, Exception("database is locked"))
        return "ok"

    assert with_retry(flaky) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        with_retry(lambda: (_ for _ in ()).throw(ValueError("other")))


def test_reconcile_fails_stale_trial_and_enqueues_it_once(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    cfg = _cfg(tmp_path)
    study = create_or_continue(cfg, url, log=_silent)
    space = load_space("sassha", "sassha")
    trial = study.ask()
    params = suggest(trial, space)
    study_storage(study).set_trial_system_attr(trial_id(trial), HEARTBEAT_KEY, time.time() - 100)
    fresh = study.ask()  # a live trial of another worker: heartbeat recent
    study_storage(study).set_trial_system_attr(trial_id(fresh), HEARTBEAT_KEY, time.time())

    assert reconcile(study, stale_after=2, log=_silent) == [trial.number]
    assert reconcile(study, stale_after=2, log=_silent) == []  # no double retry
    trials = study.get_trials()
    lost = trials[trial.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["failure_reason"] == "lost"
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1
    retry = study.ask()
    assert retry.number == waiting[0].number
    assert suggest(retry, space) == params
    assert study.get_trials()[retry.number].user_attrs["retry_of"] == trial.number
    assert trials[fresh.number].state == TrialState.RUNNING
    # the lost trial does not count toward the budget, the retry and the live one do
    assert budget_used(study.get_trials()) == 2


def test_changed_search_space_is_refused_unless_allowed(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    create_or_continue(_cfg(tmp_path), url, log=_silent)
    inline = {"params": {"lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True}}}
    changed = _cfg(tmp_path, optimizer__search_space=inline)
    with pytest.raises(UserError, match="different search space"):
        create_or_continue(changed, url, log=_silent)
    study = create_or_continue(changed, url, allow_space_change=True, log=_silent)
    assert list(study.user_attrs["search_space"]["params"]) == ["lr"]
    # budget may change; the task may not
    create_or_continue(_cfg(tmp_path, optimizer__search_space=inline, budget__n_trials=9), url, log=_silent)
    with pytest.raises(UserError, match="task.epochs"):
        create_or_continue(_cfg(tmp_path, optimizer__search_space=inline, task__epochs=3), url, log=_silent)


def test_study_stores_config_and_published_enqueue(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = create_or_continue(_cfg(tmp_path, optimizer__search_space="sassha", optimizer__enqueue_published=True),
                               url, log=_silent)
    attrs = study.user_attrs
    assert attrs["optimizer"] == "sassha" and attrs["config"]["task"]["dataset"] == "mnist1d"
    assert set(attrs["search_space"]["params"]) == {"lr", "rho", "lazy_hessian", "eps", "weight_decay"}
    assert "sassha_tune_version" in attrs
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == len(load_space("sassha", "sassha").published)


def _sample(cfg, study, space, n_so_far):
    study.sampler = sampler_for(cfg, trial_seed(cfg.sampler_seed, n_so_far))
    trial = study.ask()
    params = suggest(trial, space)
    study.tell(trial, 0.5)
    return params


def test_resumed_seeded_study_does_not_repeat_params(tmp_path):
    cfg = _cfg(tmp_path)
    space = load_space("sassha", "sassha")
    url = f"sqlite:///{tmp_path}/r.db"
    storage = open_storage(url)
    study = optuna.create_study(study_name="r", storage=storage, direction="maximize")
    first = [_sample(cfg, study, space, i) for i in range(3)]
    # a new process loads the study and goes on
    study2 = optuna.load_study(study_name="r", storage=open_storage(url))
    second = [_sample(cfg, study2, space, len(study2.trials)) for _ in range(3)]
    assert not any(p in first for p in second)
    # same seed and same progress -> same params (reproducible single-worker runs)
    again = optuna.create_study()
    assert _sample(cfg, again, space, 0) == first[0]


def test_qmc_sampler_varies_params_while_no_trial_has_completed(tmp_path):
    # QMC samples with its independent sampler until a trial completes; every trial here fails
    # (as when the first configurations diverge), and each gets a freshly built sampler.
    cfg = _cfg(tmp_path, study__sampler="qmc")
    space = load_space("sassha", "sassha")
    study = optuna.create_study(study_name="q", storage=open_storage(f"sqlite:///{tmp_path}/q.db"))
    seen = []
    for i in range(4):
        study.sampler = sampler_for(cfg, trial_seed(cfg.sampler_seed, i, 0))
        trial = study.ask()
        seen.append(suggest(trial, space))
        study.tell(trial, state=TrialState.FAIL)
    assert len({tuple(sorted(p.items())) for p in seen}) == 4


def test_loop_picks_up_a_budget_raised_by_another_process(tmp_path):
    # the loop re-reads the stored config before every trial: a budget raised meanwhile (what
    # `resume --n-trials` does from another process) runs more trials in this one
    url = f"sqlite:///{tmp_path}/b.db"
    cfg = _cfg(tmp_path, budget__n_trials=1, task__max_steps_per_epoch=1, metrics__sharpness=False)
    create_or_continue(cfg, url, log=_silent)
    other = optuna.load_study(study_name="unit", storage=open_storage(url))
    lines = []

    def log(line):
        lines.append(line)
        if line.startswith("trial 0 started"):
            set_budget(other, 2)

    summary = run_trials("unit", url, device="cpu", log=log)
    assert summary.ran == 2 and summary.stopped_because == "budget reached (2/2 trials)", lines
    assert budget_used(optuna.load_study(study_name="unit", storage=url).trials) == 2
