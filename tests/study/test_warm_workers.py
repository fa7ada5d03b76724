"""Warm trial workers (the default; ``--fresh-process`` turns them off): one long-lived trial
process runs trial after trial, and every trial stores exactly what it stores in a fresh process
(real processes, real SQLite, real training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import untimed
from optuna.trial import TrialState

from sassha_tune.app.api import run_study

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, name: str, **task) -> Path:
    cfg = {
        # no pruner: every trial trains to the end in both modes (what is compared)
        "study": {"name": name, "storage": f"sqlite:///{tmp_path / (name + '.db')}", "pruner": "none"},
        "budget": {"n_trials": 3},
        "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [32]}, "epochs": 2,
                 "batch_size": 64, "max_steps_per_epoch": 8, **task},
        "optimizer": {
            "name": "sassha", "fixed": {"lazy_hessian": 2},
            "enqueue_published": True,
            "search_space": {
                "params": {"lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
                           "rho": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
                "published": [{"lr": 0.1, "rho": 0.05}, {"lr": 0.03, "rho": 0.1}, {"lr": 0.2, "rho": 0.02}],
            },
        },
        "metrics": {"subset_size": 64, "budget": {"lambda_max_iters": 5, "trace_probes": 3, "sam_steps": 2}},
        "device": "cpu",
        "seed": 0,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_warm_and_fresh_trials_store_exactly_the_same_values(tmp_path):
    lines: list[str] = []
    warm = run_study(_config(tmp_path, "warm"), pack=1, log=lines.append)
    fresh = run_study(_config(tmp_path, "fresh"), pack=1, fresh_process=True, log=lambda _line: None)
    w = sorted(warm.trials, key=lambda t: t.number)
    f = sorted(fresh.trials, key=lambda t: t.number)
    assert [t.state for t in w] == [TrialState.COMPLETE] * 3 == [t.state for t in f]
    for a, b in zip(w, f, strict=True):
        assert a.params == b.params
        assert a.values == b.values  # floats compared with ==
        assert untimed(a.user_attrs) == untimed(b.user_attrs)
        assert a.intermediate_values == b.intermediate_values
    assert isinstance(w[0].user_attrs["lambda_max"], float)
    started = [line for line in lines if line.startswith("warm trial worker")]
    assert len(started) == 1 and "replacing" not in started[0]  # one worker ran all three


def test_a_worker_is_replaced_after_out_of_memory(tmp_path):
    """Every trial runs out of memory (an emulated limit of the plug-in model): each gets a new worker."""
    lines: list[str] = []
    path = _config(tmp_path, "oom", model="plugins_example:memory_limited",
                   model_options={"max_members": 0})
    data = yaml.safe_load(path.read_text())
    data["budget"]["n_trials"] = 2
    path.write_text(yaml.safe_dump(data))
    study = run_study(path, pack=1, log=lines.append)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.FAIL]
    assert [t.user_attrs["failure_reason"] for t in trials[:2]] == ["out_of_memory", "out_of_memory"]
    started = [line for line in lines if line.startswith("warm trial worker")]
    assert len(started) == 2 and started[1].endswith("after out of memory)"), started


def test_the_early_worker_is_closed_unused_when_the_config_wants_fresh_processes(tmp_path):
    """``run`` starts the warm worker before the config is known (its imports overlap the
    validation's); a config whose trials run in fresh processes closes it without a job, and a
    config refused by validation leaves no worker behind either."""
    from sassha_tune.config import load_config
    from sassha_tune.errors import ConfigError
    from sassha_tune.study.loop import Launcher

    launcher = Launcher(False, lambda _line: None)
    launcher.spawn()
    assert launcher.worker is not None
    proc = launcher.worker.proc
    cfg = load_config(_config(tmp_path, "fresh"))
    cfg.study.fresh_process = True
    launcher.prestart(cfg, "auto", None)
    assert launcher.worker is None and proc.poll() is not None  # ended and waited for
    launcher.close()

    path = _config(tmp_path, "bad")
    path.write_text(path.read_text().replace("epochs: 2", "epochs: -2"))
    spawned = []
    real_spawn = Launcher.spawn

    def spawn(self):
        real_spawn(self)
        spawned.append(self.worker.proc)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Launcher, "spawn", spawn)
        with pytest.raises(ConfigError, match="task.epochs"):
            run_study(path, pack=1, log=lambda _line: None)
    assert len(spawned) == 1 and spawned[0].poll() is not None
