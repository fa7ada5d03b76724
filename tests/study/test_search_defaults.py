"""The search sassha-tune runs by default (issue 24): the space's prior enqueued first, exactly once;
diverged trials as evidence for the sampler; successive halving over epochs; a study created
before keeps its own settings; the space chosen for a model without normalization.

Real SQLite studies, real trial processes and training where a study runs; Optuna's own TPE and
successive halving where a decision is checked on a crafted study."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import sassha_tune
from sassha_tune.config import config_from_dict
from sassha_tune.config.search import AUTO_SAMPLER_OPTIONS, auto_pruner, make_sampler
from sassha_tune.config.spaces import load_space
from sassha_tune.study.budget import budget_used
from sassha_tune.study.create import create_or_continue
from sassha_tune.study.loop import pruner_for, sampler_for
from sassha_tune.study.storage import open_storage
from sassha_tune.study.tell import finish
from sassha_tune.trial.outcome import TrialOutcome

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY = {
    "study": {"name": "defaults"},
    "budget": {"n_trials": 4},
    "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [16]}, "epochs": 2,
             "batch_size": 64, "max_steps_per_epoch": 3},
    "optimizer": {"name": "sassha"},
    "metrics": {"sharpness": False},
    "device": "cpu",
}


def _tiny(**sections):
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def _silent(_line: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# the prior, enqueued first and exactly once


def test_the_prior_runs_first_exactly_once_across_resumes_and_workers(tmp_path):
    """Created twice (another machine's `run --create-only`), then run by two `worker` processes at
    once, then resumed: the two prior configurations of the space the MLP gets (sassha_nonorm) run
    once each, as the first two trials."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    for _ in range(2):
        sassha_tune.run_study(_tiny(), storage=url, log=_silent, create_only=True)
    study = optuna.load_study(study_name="defaults", storage=url)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs.get("prior") for t in waiting] == ["dense-start-lr0.1", "dense-start-lr0.3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "sassha_tune.app.cli", "worker", "defaults", "--storage", url,
                                 "--worker-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for i in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    sassha_tune.resume_study("defaults", storage=url, n_trials=5, log=_silent)
    trials = optuna.load_study(study_name="defaults", storage=url).get_trials()
    # 5 counted trials (a worker that lost the race for the last slot fails one `over_budget`)
    assert budget_used(trials) == 5 and all(t.state.is_finished() for t in trials)
    for entry in load_space("sassha_nonorm", "sassha").prior:
        values = {k: v for k, v in entry.items() if k in ("lr", "rho", "lazy_hessian", "eps", "weight_decay")}
        ran = [t.number for t in trials if all(t.params.get(k) == v for k, v in values.items())]
        assert len(ran) == 1 and ran[0] in (0, 1), (entry["source"], ran)
    assert sorted(t.user_attrs["prior"] for t in trials if "prior" in t.user_attrs) == [
        "dense-start-lr0.1", "dense-start-lr0.3"]


def test_an_explicit_enqueue_published_wins_over_the_prior(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_or_continue(config_from_dict(_tiny(optimizer={"enqueue_published": False})), url, log=_silent)
    assert study.get_trials(states=(TrialState.WAITING,)) == []


# --------------------------------------------------------------------------------------------
# diverged trials as evidence


def _diverged_region_share(diverged_as_pruned: bool) -> tuple[float, optuna.Study]:
    """A study of one parameter, lr in [1e-3, 1] (log): six complete trials at small lr, six trials
    that diverged at lr >= 0.3, told through the study's tell with or without diverged_as_pruned;
    then the share of 60 proposals of sampler ``auto`` that land at lr >= 0.3."""
    study = optuna.create_study(direction="maximize")
    dist = optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)
    for i, lr in enumerate([0.002, 0.004, 0.008, 0.016, 0.03, 0.06]):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions={"lr": dist}, value=0.5 + 0.05 * i,
                                                  intermediate_values={1: 0.4 + 0.05 * i}))
    for lr in [0.3, 0.4, 0.5, 0.6, 0.8, 0.95]:
        study.enqueue_trial({"lr": lr})
        trial = study.ask({"lr": dist})
        finish(study, trial, TrialOutcome("fail", failure_reason="diverged"), diverged_as_pruned=diverged_as_pruned,
               reports=True)
    high = 0
    for seed in range(60):
        study.sampler = make_sampler("auto", {}, seed, qmc_seed=0)
        trial = study.ask({"lr": dist})
        high += trial.params["lr"] >= 0.3
        study.tell(trial, state=TrialState.FAIL)  # invisible to TPE: the next proposal sees the same evidence
    return high / 60, study


def test_a_diverged_trial_moves_the_sampler_away_from_its_region():
    """Told PRUNED with a NaN, the diverged region gets few proposals; told FAIL (Optuna's samplers
    do not see FAIL trials) it gets as many as if nothing had diverged there."""
    share_pruned, study = _diverged_region_share(True)
    share_failed, _ = _diverged_region_share(False)
    told = [t for t in study.trials if t.user_attrs.get("failure_reason") == "diverged"]
    assert len(told) == 6 and all(t.state == TrialState.PRUNED for t in told)
    assert all(math.isnan(t.intermediate_values[1]) for t in told)
    assert share_pruned <= 0.1 < 0.25 <= share_failed, (share_pruned, share_failed)


def test_a_diverged_trial_is_still_reported_as_diverged_and_never_selected(tmp_path):
    """A real study whose every trial diverges within its first ten steps (lr 1, eps 1e-8, lazy
    refreshes on an MLP of 256 x 256): stored PRUNED with failure_reason diverged and the epochs it
    trained, the log says so, and no best trial exists."""
    lines: list[str] = []
    cfg = _tiny(optimizer={"search_space": {"params": {"weight_decay": {"type": "float", "low": 1e-5, "high": 1e-4}}},
                           "fixed": {"lr": 1.0, "eps": 1e-8, "lazy_hessian": 10, "rho": 0.05}},
                task={**TINY["task"], "model_options": {"hidden": [256, 256]}, "max_steps_per_epoch": 12},
                budget={"n_trials": 2})
    study = sassha_tune.run_study(cfg, storage=f"sqlite:///{tmp_path / 's.db'}", log=lines.append)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert {t.user_attrs["failure_reason"] for t in study.trials} == {"diverged"}
    assert all(0 < t.user_attrs["epochs_trained"] < 1 for t in study.trials)  # to the step, within epoch 1
    assert sum("PRUNED (diverged in epoch 1)" in line for line in lines) == 2, lines
    assert [t for t in study.trials if t.state == TrialState.COMPLETE] == []


# --------------------------------------------------------------------------------------------
# multi-fidelity


@pytest.mark.parametrize(("epochs", "can_prune", "expected"), [
    (10, True, ("successive_halving", {"min_resource": 1, "reduction_factor": 3})),
    (50, True, ("successive_halving", {"min_resource": 5, "reduction_factor": 3})),
    (2, True, ("successive_halving", {"min_resource": 1, "reduction_factor": 3})),
    (1, True, ("none", {})),  # no rung in the first half
    (10, False, ("none", {})),  # several objectives, or one not reported per epoch
])
def test_the_auto_pruner_fits_the_trial_length(epochs, can_prune, expected):
    assert auto_pruner(epochs, can_prune) == expected


def test_successive_halving_keeps_the_best_third_at_each_rung():
    """A crafted study under pruner auto (10 epochs: rungs at epochs 1 and 3, none past half the
    epochs). At a rung a trial goes on only among the best third of the trials that reached it
    (with fewer than three there: only as the best so far), is never judged between rungs or in the
    second half of its epochs, and a NaN (a diverged epoch) stops it."""
    cfg = config_from_dict(_tiny(task={**TINY["task"], "epochs": 10}))
    study = optuna.create_study(direction="maximize", pruner=pruner_for(cfg))

    def at_epoch_1(value: float) -> bool:
        trial = study.ask()
        trial.report(value, 1)
        return trial.should_prune()

    # alone: goes on; 2nd and 3rd of fewer than three: only as the best; then the best third
    decisions = [at_epoch_1(v) for v in (0.90, 0.80, 0.95, 0.70, 0.60, 0.50)]
    assert decisions == [False, True, False, True, True, True]
    keep = study.ask()
    keep.report(0.92, 1)
    assert not keep.should_prune()  # 2nd of 7: the best third is the best 7 // 3 = 2
    assert at_epoch_1(0.91)  # 3rd of 8: not
    keep.report(0.20, 2)
    assert not keep.should_prune()  # between rungs: never judged
    keep.report(0.50, 3)
    assert not keep.should_prune()  # the first at the epoch-3 rung: goes on
    late = study.ask()
    for epoch, value in ((1, 0.99), (2, 0.90), (3, 0.40)):
        late.report(value, epoch)
    assert late.should_prune()  # at epoch 3, below the one trial already there
    keep.report(0.9, 9)
    assert not keep.should_prune()
    slow = study.ask()
    for epoch, value in ((1, 0.99), (2, 0.9), (3, 0.6), (6, 0.1), (9, 0.1)):
        slow.report(value, epoch)
        assert not slow.should_prune(), epoch  # Optuna's own would judge epoch 9 (rung 1 x 3^2)
    diverging = study.ask()
    diverging.report(float("nan"), 1)
    assert diverging.should_prune()


def test_sampler_auto_is_tpe_with_few_start_up_trials_and_options_override():
    cfg = config_from_dict(TINY)
    sampler = sampler_for(cfg, 7)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == AUTO_SAMPLER_OPTIONS["n_startup_trials"] == 4  # noqa: SLF001
    assert make_sampler("auto", {"n_startup_trials": 9}, 0, qmc_seed=0)._n_startup_trials == 9  # noqa: SLF001
    explicit = config_from_dict(_tiny(study={"sampler": "tpe"}))
    assert sampler_for(explicit, 7)._n_startup_trials == 10  # noqa: SLF001  (Optuna's default)


# --------------------------------------------------------------------------------------------
# a study created before keeps its settings


def test_a_study_created_before_keeps_its_settings(tmp_path):
    """A study stored by the previous version (sampler tpe, pruner none, nothing enqueued, no
    diverged_as_pruned key, the sassha space on an MLP) continued by a config that writes none of
    those: every one is kept; a setting the config writes still applies (sampler, a mutable one)."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    old = config_from_dict(_tiny(study={"sampler": "tpe", "pruner": "none"},
                                 optimizer={"search_space": "sassha", "enqueue_published": False}))
    study = create_or_continue(old, url, log=_silent)
    stored = dict(study.user_attrs["config"])
    stored["study"] = {k: v for k, v in stored["study"].items() if k != "diverged_as_pruned"}
    study.set_user_attr("config", stored)  # as the previous version stored it
    continued = create_or_continue(config_from_dict(TINY), url, log=_silent)
    kept = continued.user_attrs["config"]
    assert kept["study"]["sampler"]["name"] == "tpe" and kept["study"]["pruner"]["name"] == "none"
    assert kept["study"]["diverged_as_pruned"] is False and kept["optimizer"]["enqueue_published"] is False
    assert set(continued.user_attrs["search_space"]["params"]) == {"lr", "rho", "lazy_hessian", "eps", "weight_decay"}
    assert continued.get_trials(states=(TrialState.WAITING,)) == []
    written = create_or_continue(config_from_dict(_tiny(study={"sampler": "random"})), url, log=_silent)
    assert written.user_attrs["config"]["study"]["sampler"]["name"] == "random"
    assert written.user_attrs["config"]["study"]["pruner"]["name"] == "none"


def test_a_new_study_gets_the_new_defaults(tmp_path):
    study = create_or_continue(config_from_dict(TINY), f"sqlite:///{tmp_path / 's.db'}", log=_silent)
    stored = study.user_attrs["config"]
    assert stored["study"]["sampler"]["name"] == "auto" and stored["study"]["pruner"]["name"] == "auto"
    assert stored["study"]["diverged_as_pruned"] is True and stored["optimizer"]["enqueue_published"] == "auto"
    assert "dense_refresh_steps" in study.user_attrs["search_space"]["params"]  # sassha_nonorm for the MLP


# --------------------------------------------------------------------------------------------
# the space for a model without normalization


@pytest.mark.parametrize(("model", "space"), [("plugins_example:tiny_linear", "sassha_nonorm"),
                                              ("plugins_example:tiny_batchnorm", "sassha")])
def test_a_plugin_model_gets_the_space_its_layers_call_for(tmp_path, model, space):
    """A plug-in is judged once built (preflight): no normalization layer -> sassha_nonorm and its
    prior, with a note; a BatchNorm -> sassha and the published prior."""
    lines: list[str] = []
    cfg = _tiny(task={**TINY["task"], "model": model, "model_options": {}}, budget={"n_trials": 1})
    study = sassha_tune.run_study(cfg, storage=f"sqlite:///{tmp_path / 's.db'}", log=lines.append, create_only=True)
    params = set(study.user_attrs["search_space"]["params"])
    assert ("dense_refresh_steps" in params) is (space == "sassha_nonorm")
    waiting = study.get_trials(states=(TrialState.WAITING,))
    expected = [e["source"] for e in load_space(space, "sassha").prior]
    assert [t.user_attrs.get("prior") or t.user_attrs.get("published") for t in waiting] == expected
    noted = [line for line in lines if "has no normalization layers: searching the sassha_nonorm space" in line]
    assert len(noted) == (space == "sassha_nonorm")


def test_create_only_stores_the_prior_and_runs_nothing(tmp_path):
    """--create-only with the defaults stores the study and its prior, runs nothing."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    sassha_tune.run_study(_tiny(), storage=url, log=_silent, create_only=True)
    study = optuna.load_study(study_name="defaults", storage=open_storage(url))
    assert [t.state for t in study.trials] == [TrialState.WAITING] * 2


# --------------------------------------------------------------------------------------------
# warm start from an earlier study


def test_a_warm_start_runs_the_best_configurations_of_an_earlier_study_first(tmp_path):
    """Tune small, then continue big: study.warm_start enqueues the earlier study's best complete
    configurations (by its objective, near-chance trials left out) instead of the prior; a study
    that is not in the storage is a one-line error before anything is stored."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    small = sassha_tune.run_study(_tiny(study={"name": "small", "pruner": "none"}, budget={"n_trials": 4}),
                                  storage=url, log=_silent)
    ranked = sorted((t for t in small.trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.values[0], t.number))
    big = create_or_continue(config_from_dict(_tiny(study={"name": "big", "warm_start": {"study": "small", "top": 2}},
                                                    task={**TINY["task"], "epochs": 3})), url, log=_silent)
    waiting = big.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs["warm_start"] for t in waiting] == [f"small#{t.number}" for t in ranked[:2]]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [ranked[0].params, ranked[1].params]
    with pytest.raises(sassha_tune.UserError, match=r"study.warm_start: no study 'nope' in this storage"):
        create_or_continue(config_from_dict(_tiny(study={"name": "other", "warm_start": "nope"})), url, log=_silent)
    assert "other" not in optuna.get_all_study_names(url)


@pytest.mark.parametrize(("value", "expected"), [
    ("defaults", "study.warm_start: names this study ('defaults'); name an earlier one"),
    (3, "study.warm_start: expected a mapping"),
    ({"study": "x", "top": 0}, "study.warm_start.top: expected an integer"),
    ({"top": 2}, "study.warm_start.study: expected a value"),
])
def test_a_malformed_warm_start_is_one_line_naming_its_key(value, expected):
    with pytest.raises(sassha_tune.UserError) as info:
        config_from_dict(_tiny(study={"warm_start": value}))
    assert expected in str(info.value) and "\n" not in str(info.value)
