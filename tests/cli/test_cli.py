"""End to end through the real CLI on MNIST-1D with a tiny model and a real SQLite file:
run -> status -> export -> train, SIGKILL then resume, Ctrl-C, multi-objective, --help."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.metrics.names import STORED_ATTRS
from sassha_tune.study.budget import budget_used

pytestmark = pytest.mark.slow

TINY = {
    "study": {"name": "tiny", "heartbeat_interval": 0.5, "stale_after": 2.5},
    "budget": {"n_trials": 3},
    "task": {
        "dataset": "mnist1d",
        "model": "mlp",
        "model_options": {"hidden": [32]},
        "epochs": 1,
        "batch_size": 64,
        "max_steps_per_epoch": 4,
    },
    "optimizer": {"name": "sassha", "fixed": {"lazy_hessian": 2}, "search_space": {
        "params": {
            "lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
            "rho": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
            "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        },
    }},
    "metrics": {"subset_size": 128, "budget": {"lambda_max_iters": 5, "trace_probes": 4, "sam_steps": 2}},
    "device": "cpu",
    "seed": 0,
}


def _config(tmp_path: Path, name: str = "tiny", **top) -> Path:
    d = yaml.safe_load(yaml.safe_dump(TINY))
    d["study"]["name"] = name
    for k, v in top.items():
        d[k] = v if not isinstance(v, dict) else {**d.get(k, {}), **v}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _invoke(args: list[str]):
    result = CliRunner(env={"OMP_NUM_THREADS": "1"}).invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _trials(url: str, name: str):
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def test_run_status_export_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path)
    t0 = time.monotonic()
    ran = _invoke(["run", str(cfg)])  # default storage: sqlite:///sassha-tune.db in the working directory
    run_seconds = time.monotonic() - t0
    url = "sqlite:///sassha-tune.db"
    trials = _trials(url, "tiny")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    # piped (not a terminal): the log lines as they always were, no live area, then one summary line
    lines = ran.output.splitlines()
    assert "\x1b" not in ran.output
    assert lines[:2] == [f"created study 'tiny' in {url}",
                         "one trial at a time (--pack auto on the CPU: a small model already uses the cores)"]
    assert re.fullmatch(r"warm trial worker \d+ started", lines[3])  # one worker, announced by its first trial
    assert [line.split(":")[0].split(" COMPLETE")[0] for line in lines[2:3] + lines[4:9]] == [
        "trial 0 started", "trial 0", "trial 1 started", "trial 1", "trial 2 started", "trial 2"]
    assert lines[-2].startswith("done: 3 trials this run (COMPLETE 3) in ")
    best = max(trials, key=lambda t: (t.values[0], -t.number))
    assert lines[-1].startswith("3 trials in ") and lines[-1].endswith(
        f": 3 complete; best val_acc {best.values[0]:.4g} (trial {best.number})")
    assert len(lines) == 11
    for t in trials:
        missing = [k for k in STORED_ATTRS if k not in t.user_attrs]
        assert not missing, missing
        assert t.user_attrs["device"] == "cpu" and t.user_attrs["epochs_completed"] == 1
        assert t.user_attrs["hvp_count"] > 0
        # the wd convention: the optimizer got weight_decay / lr
        hp = t.user_attrs["optimizer_hparams"]
        assert hp["weight_decay"] == pytest.approx(t.params["weight_decay"] / t.params["lr"])
        assert hp["lazy_hessian"] == 2
    study = optuna.load_study(study_name="tiny", storage=url)
    assert study.user_attrs["optimizer"] == "sassha" and "config" in study.user_attrs

    status = _invoke(["status"]).output
    assert "tiny" in status and "3/3" in status
    assert "best trial" in _invoke(["status", "tiny"]).output

    # running again with the budget spent runs nothing
    assert "budget reached" in _invoke(["run", str(cfg)]).output
    assert len(_trials(url, "tiny")) == 3

    exported = tmp_path / "best.yaml"
    _invoke(["export", "tiny", "--out", str(exported)])
    best = max(trials, key=lambda t: (t.values[0], -t.number))
    d = yaml.safe_load(exported.read_text())
    assert d["provenance"]["trial"] == best.number
    assert d["optimizer"]["fixed"]["lr"] == best.params["lr"]
    as_json = _invoke(["export", "tiny", "--format", "json"]).stdout
    assert json.loads(as_json)["optimizer"]["fixed"] == d["optimizer"]["fixed"]
    # kwargs: the constructor's arguments as the trial's optimizer got them (wd / lr), ready to pass
    k = json.loads(_invoke(["export", "tiny", "--format", "kwargs"]).stdout)
    assert k["class"] == "sassha_tune.Sassha" and k["provenance"]["trial"] == best.number
    assert k["construct"] == "sassha_tune.Sassha(model.parameters(), model=model, **kwargs)"
    assert k["kwargs"] == best.user_attrs["optimizer_hparams"]  # sassha: no registry defaults over them
    import torch

    import sassha_tune

    model = torch.nn.Linear(40, 10)
    opt = eval(k["construct"], {"sassha_tune": sassha_tune, "model": model, "kwargs": k["kwargs"]})
    assert k["schedule"]["name"] == d["schedule"]["name"]
    assert opt.seed == k["kwargs"].pop("seed")  # the probe seed is the one constructor argument outside the groups
    for key, value in k["kwargs"].items():
        got = opt.param_groups[0][key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key

    _invoke(["report", "tiny", "--out", str(tmp_path / "rep")])
    assert (tmp_path / "rep" / "report.md").is_file()
    _invoke(["compare", "tiny", "--out", str(tmp_path / "cmp")])
    assert (tmp_path / "cmp" / "compare.md").is_file()

    metrics = tmp_path / "m.json"
    _invoke(["train", str(exported), "--metrics-out", str(metrics)])
    m = json.loads(metrics.read_text())
    assert m["val_acc"] == pytest.approx(best.user_attrs["val_acc"], abs=1e-9)
    assert m["val_loss"] == pytest.approx(best.user_attrs["val_loss"], rel=1e-6)
    print(f"3-trial run: {run_seconds:.1f} s")


def _interruptible() -> None:
    """In the child before it starts Python: Ctrl-C as on a terminal. A test session started in the
    background (``cmd &`` without job control) passes SIGINT on as ignored, and Python then never
    raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_run(cfg: Path, url: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sassha_tune.app.cli", "run", str(cfg), "--storage", url],
        cwd=cwd, env=_env(), stdout=subprocess.PIPE, text=True, preexec_fn=_interruptible,
    )


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        if text in line:
            return
        assert time.monotonic() < deadline, f"no {text!r} in time"
    raise AssertionError(f"process ended before {text!r}")


def test_sigkill_then_resume(tmp_path):
    url = f"sqlite:///{tmp_path}/k.db"
    cfg = _config(tmp_path, "killed", budget={"n_trials": 4})
    proc = _start_run(cfg, url, tmp_path)
    _wait_for(proc, "trial 1 started")  # RUNNING from here; in the warm worker it takes well under a second
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t for t in _trials(url, "killed")}
    assert before[0].state == TrialState.COMPLETE
    assert before[1].state == TrialState.RUNNING  # the zombie Optuna would keep forever

    t0 = time.monotonic()
    out = _invoke(["resume", "killed", "--storage", url]).output
    resume_seconds = time.monotonic() - t0
    assert "lost" in out
    trials = _trials(url, "killed")
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    lost = trials[1]
    assert lost.state == TrialState.FAIL and lost.user_attrs["failure_reason"] == "lost"
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert len(retries) == 1 and retries[0].params == lost.params and retries[0].state == TrialState.COMPLETE
    assert budget_used(trials) == 4
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 4
    # the trial finished before the kill is untouched
    assert trials[0].values == before[0].values and trials[0].user_attrs == before[0].user_attrs
    print(f"resume after SIGKILL: {resume_seconds:.1f} s")


def test_ctrl_c_marks_the_running_trial_interrupted(tmp_path):
    url = f"sqlite:///{tmp_path}/i.db"
    # trials of seconds: the warm worker is ready when trial 0 starts, so a tiny one could end within the sleep
    cfg = _config(tmp_path, "interrupted", budget={"n_trials": 5}, task={"epochs": 10, "max_steps_per_epoch": 40})
    proc = _start_run(cfg, url, tmp_path)
    _wait_for(proc, "trial 0 started")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    trials = _trials(url, "interrupted")
    assert len(trials) == 1
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["failure_reason"] == "interrupted"
    assert budget_used(trials) == 0


def test_two_objectives(tmp_path):
    url = f"sqlite:///{tmp_path}/mo.db"
    cfg = _config(
        tmp_path, "mo", budget={"n_trials": 2},
        study={"objectives": ["val_acc", {"metric": "lambda_max", "direction": "minimize"}]},
        optimizer={"name": "sgd", "fixed": {}, "search_space": "sgd"},
    )
    ran = _invoke(["run", str(cfg), "--storage", url])
    assert ran.output.splitlines()[-1].split("; ")[-1].startswith("Pareto front: ")  # the summary line
    trials = _trials(url, "mo")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        assert t.values == [t.user_attrs["val_acc"], t.user_attrs["lambda_max"]]
        # SGD gets the script's wd unchanged (coupled L2)
        assert t.user_attrs["optimizer_hparams"]["weight_decay"] == t.params["weight_decay"]


def test_storage_errors_are_one_line_and_masked(tmp_path):
    result = CliRunner().invoke(app, ["status", "--storage", "postgresql+psycopg://bob:hunter2@127.0.0.1:1/x"])
    assert result.exit_code == 2
    assert "hunter2" not in result.output and "***" in result.stderr
    assert result.stderr.count("\n") == 1
    result = CliRunner().invoke(app, ["resume", "nope", "--storage", f"sqlite:///{tmp_path}/e.db"])
    assert result.exit_code == 2 and "no study 'nope'" in result.stderr


def test_bad_gpus_flag(tmp_path):
    result = CliRunner().invoke(app, ["run", str(_config(tmp_path)), "--gpus", "0,x"])
    assert result.exit_code == 2 and "--gpus" in result.stderr


COMMAND_OPTIONS = {
    "run": ["--storage", "--allow-space-change", "--gpus", "--n-trials", "--device", "--create-only"],
    "resume": ["--storage", "--n-trials", "--gpus", "--device"],
    "worker": ["--storage", "--device", "--worker-id"],
    "status": ["--storage"],
    "export": ["--storage", "--format", "--out", "--trial"],
    "train": ["--params", "--device", "--metrics-out"],
    "report": ["--storage", "--out"],
    "compare": ["--storage", "--out"],
}


@pytest.mark.parametrize("command", sorted(COMMAND_OPTIONS))
def test_every_command_documents_its_options(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for opt in COMMAND_OPTIONS[command]:
        assert opt in result.output
    # each option line carries a description, not just a name
    lines = [ln for ln in result.output.splitlines() if "--" in ln and "--help" not in ln]
    assert all(len(ln.split()) > 3 for ln in lines), lines


def test_version_completion_and_choices():
    import importlib.metadata

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"sassha-tune {importlib.metadata.version('sassha-tune')}\n"
    # shell completion, as the installed bash script asks for it: command names, then choices
    def complete(words: str) -> list[str]:
        env = {"_SASSHA_TUNE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
        result = CliRunner().invoke(app, [], prog_name="sassha-tune", env=env)
        assert result.exit_code == 0, result.output
        return result.output.split()

    assert complete("sassha-tune ex") == ["export"]
    assert complete("sassha-tune export s --format ") == ["yaml", "json", "kwargs"]
    # an enumerated option lists its choices, and a wrong one is one line naming them
    assert "yaml|json|kwargs" in CliRunner().invoke(app, ["export", "--help"], terminal_width=200).output
    bad = subprocess.run([sys.executable, "-m", "sassha_tune", "export", "s", "--format", "xml"],
                         capture_output=True, text=True, env=_env())
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--format" in bad.stderr and "'xml' is not one of 'yaml', 'json', 'kwargs'" in bad.stderr
    # commands that name a study have no config to take a storage from, and say so
    status_help = CliRunner().invoke(app, ["status", "--help"], terminal_width=200).output
    assert "study.storage" not in status_help and "sqlite:///sassha-tune.db" in status_help
