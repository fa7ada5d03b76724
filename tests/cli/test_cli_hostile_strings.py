"""Outputs trust nothing they read: a study written by another Optuna client, whose name,
attributes, parameter names and choices and failure reasons hold HTML, markdown table syntax and
terminal escape sequences, is reported, listed, compared and exported (through the real CLI and
a real SQLite file) without any of it becoming markup in report.md / compare.md / report.html or
reaching the terminal raw; the files the user names are never written through a symbolic link."""

from __future__ import annotations

import re

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from sassha_tune.app.cli import app

optuna.logging.set_verbosity(optuna.logging.WARNING)

ESC = "\x1b]0;pwned\x07\x1b[2J"  # retitle the terminal, clear the screen
NAME = f"<img src=x onerror=alert(1)>{ESC}study"
SCRIPT = "<script>alert(1)</script>"
CHOICES = (f"<b>bold</b>|pipe{ESC}", "[link](javascript:alert(1))")


def _invoke(args: list[str]):
    return CliRunner(env={"OMP_NUM_THREADS": "1"}).invoke(app, [str(a) for a in args])


def _hostile(url: str, name: str = NAME) -> None:
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.set_user_attr("optimizer", f"`{SCRIPT}`{ESC}")
    study.set_user_attr("objectives", [f"val_acc maximize{ESC}"])
    study.set_user_attr("config", {"study": {"name": "x"}, "optimizer": {"name": "sgd"}})
    space = {f"lr{SCRIPT}": FloatDistribution(1e-3, 1.0, log=True), "choice": CategoricalDistribution(CHOICES)}
    for k in range(6):
        acc = 0.5 + 0.05 * k
        study.add_trial(create_trial(
            value=acc, params={f"lr{SCRIPT}": 0.01 * (k + 1), "choice": CHOICES[k % 2]}, distributions=space,
            user_attrs={"val_acc": acc, "gen_gap_acc": 0.02 * k, "lambda_max": 1.0 + k, "train_loss": 1.0 - 0.1 * k,
                        "test_acc": acc, "num_classes": 10, "device": f"cpu{ESC}{SCRIPT}"}))
    study.add_trial(create_trial(state=TrialState.FAIL, params={f"lr{SCRIPT}": 0.9, "choice": CHOICES[0]},
                                 distributions=space,
                                 user_attrs={"failure_reason": f"error: RuntimeError: {SCRIPT}{ESC}| x |"}))


def _no_raw_controls(text: str) -> None:
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", text), repr(text[:300])


def _tables_render(md: str) -> None:
    """Every row of every table has as many unescaped pipes as its header."""
    for table in re.findall(r"(?m)(?:^\|.*\n)+", md):
        counts = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
        assert len(counts) == 1, table


def _no_markup(md: str) -> None:
    """No tag, link or raw control character outside code blocks (whose text is shown literally:
    the YAML of the stored settings), and every table renders."""
    prose = re.sub(r"(?ms)^(`{3,})[^\n]*\n.*?^\1\n", "", md)
    assert prose.count("```") == 0, prose  # every block closed where it was opened
    assert "<script" not in prose and "<img" not in prose and "<b>" not in prose, prose
    assert "](javascript" not in prose
    _no_raw_controls(md)
    _tables_render(md)


def test_a_hostile_study_is_reported_compared_and_listed_as_text(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    _hostile(url)
    _hostile(url, name=f"{NAME}-b")

    result = _invoke(["report", NAME, "--storage", url, "--out", tmp_path / "rep"])
    assert result.exit_code == 0, result.output
    _no_raw_controls(result.output)
    assert "\\x1b]0;pwned\\x07" in result.output  # shown, not sent
    md = (tmp_path / "rep" / "report.md").read_text()
    _no_markup(md)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md  # the failure reason, as text
    assert "&lt;img src=x onerror=alert(1)&gt;" in md.splitlines()[0]  # the title
    page = (tmp_path / "rep" / "report.html").read_text()
    assert SCRIPT not in page and "<img src=x" not in page

    result = _invoke(["compare", NAME, f"{NAME}-b", "--storage", url, "--out", tmp_path / "cmp"])
    assert result.exit_code == 0, result.output
    _no_raw_controls(result.output)
    _no_markup((tmp_path / "cmp" / "compare.md").read_text())
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert SCRIPT not in page and "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page

    for args in (["status"], ["status", NAME], ["status", "no-such-study"]):
        result = _invoke([*args, "--storage", url])
        _no_raw_controls(result.output + result.stderr)
        assert "\\x1b" in result.output + result.stderr, args  # the names are listed, escaped


def test_export_shows_escapes_and_never_writes_through_a_link(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    _hostile(url)
    result = _invoke(["export", NAME, "--storage", url])
    assert result.exit_code == 0, result.output
    _no_raw_controls(result.output)
    assert yaml.safe_load(result.output)["optimizer"]["fixed"]["choice"] in CHOICES  # still the value itself

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "best.yaml"
    link.symlink_to(victim)
    result = _invoke(["export", NAME, "--storage", url, "--out", link])
    assert result.exit_code == 2 and "--out" in result.stderr and "symbolic link" in result.stderr, result.output
    assert result.stderr.count("\n") == 1 and victim.read_text() == "keep me" and link.is_symlink()

    target = tmp_path / "real.yaml"
    target.write_text("old")
    result = _invoke(["export", NAME, "--storage", url, "--out", target])
    assert result.exit_code == 0, result.output
    _no_raw_controls(result.output)
    assert yaml.safe_load(target.read_text())["provenance"]["study"] == NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.yaml", "h.db", "real.yaml", "victim.txt"]  # no temp left


def test_train_refuses_a_linked_metrics_file_before_training(tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("keep me")
    link = tmp_path / "m.json"
    link.symlink_to(victim)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "study": {"name": "t"}, "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [8]},
                                         "epochs": 1, "max_steps_per_epoch": 1},
        "optimizer": {"name": "sgd"}, "metrics": {"sharpness": False}, "device": "cpu"}))
    result = _invoke(["train", config, "--metrics-out", link])
    assert result.exit_code == 2 and "symbolic link" in result.stderr and result.stderr.count("\n") == 1, result.output
    assert "val_acc" not in result.output  # refused before training
    assert victim.read_text() == "keep me"


def test_a_trials_exception_reaches_the_run_log_and_its_stderr_escaped(tmp_path):
    """A task.train function raising an exception whose message holds escape sequences: the run's
    log line and the trial process's traceback show them as text."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "study": {"name": "raises", "objective": "val_acc", "pruner": "none"}, "budget": {"n_trials": 1},
        "task": {"train": "plugins_misbehaving:raises_hostile", "epochs": 1},
        "optimizer": {"name": "sgd"}, "device": "cpu"}))
    result = _invoke(["run", config, "--storage", f"sqlite:///{tmp_path / 'r.db'}"])
    assert result.exit_code == 0, result.output
    _no_raw_controls(result.output)
    assert "\\x1b[2J" in result.output  # the failure line says what the message held
    reasons = [t.user_attrs["failure_reason"] for t in optuna.load_study(
        study_name="raises", storage=f"sqlite:///{tmp_path / 'r.db'}").get_trials(states=(TrialState.FAIL,))]
    assert reasons and "\x1b[2J" in reasons[0]  # the storage keeps what was raised; only outputs escape it


def test_the_trial_process_traceback_is_escaped():
    """An unexpected error in a trial (a dataset plug-in's): the trial process's traceback on its
    stderr shows the message's escape sequences as text."""
    import json
    import subprocess
    import sys

    from sassha_tune.config import config_from_dict, config_to_dict

    cfg = config_from_dict({"study": {"name": "raises"},
                            "task": {"dataset": "custom", "dataset_options": {"factory": "plugins_misbehaving:hostile_dataset"},
                                     "model": "mlp", "epochs": 1},
                            "optimizer": {"name": "sgd"}, "metrics": {"sharpness": False}, "device": "cpu"},
                           source="test")
    job = {"study": "raises", "config": config_to_dict(cfg), "params": {"lr": 0.01}, "device": "cpu", "prune": False}
    done = subprocess.run([sys.executable, "-m", "sassha_tune.trial"], input=json.dumps(job) + "\n",
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" in done.stderr and "cannot load" in done.stderr, done.stderr
    _no_raw_controls(done.stderr)
    assert "\\x1b]0;pwned\\x07" in done.stderr
