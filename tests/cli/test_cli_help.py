"""Help that helps (issue 27): every command's --help ends with examples of itself, no flag shows a
type as if it took a value (``<bool>``), and report's and compare's help name every file they write."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

import sassha_tune
from sassha_tune.app.cli import app

COMMANDS = ["init", "run", "resume", "worker", "rerun", "status", "export", "train", "report", "compare"]


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_examples_and_no_flag_shows_a_type(command):
    text = _help(command)
    examples = text.split("Examples:")[1].splitlines()
    uses = [line.strip() for line in examples if "sassha-tune " in line]
    assert uses and all(re.search(rf"sassha-tune {command}\b", u) or "sassha-tune " in u for u in uses)
    assert any(f"sassha-tune {command}" in u for u in uses)
    assert "<bool>" not in text


def test_the_app_help_shows_no_flag_type():
    assert "<bool>" not in _help()


def _words(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def test_report_and_compare_help_name_every_file_they_write(tmp_path):
    url = f"sqlite:///{tmp_path}/h.db"
    cfg = {"study": {"name": "h1", "pruner": "none"}, "budget": {"n_trials": 2},
           "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [8]}, "epochs": 1,
                    "batch_size": 64, "max_steps_per_epoch": 2},
           "optimizer": {"name": "sgd", "enqueue_published": False},
           "metrics": {"subset_size": 32, "budget": {"lambda_max_iters": 2, "trace_probes": 2, "sam_steps": 1},
                       "track_every": 1},
           "device": "cpu"}
    sassha_tune.run_study(cfg, storage=url, log=lambda _: None)
    sassha_tune.run_study({**cfg, "study": {**cfg["study"], "name": "h2"}}, storage=url, log=lambda _: None)
    for command, written in (
        ("report", sassha_tune.report("h1", storage=url, out=tmp_path / "r", log=lambda _: None)),
        ("compare", sassha_tune.compare(["h1", "h2"], storage=url, out=tmp_path / "c", log=lambda _: None)),
    ):
        text = _words(_help(command))
        names = {p.name for p in written.files}
        assert names == {p.name for p in (tmp_path / command[0]).iterdir()}  # every file it wrote is listed
        for name in names:
            stem = name.removesuffix(".png")
            if stem.startswith("slice_"):
                assert "slice_<param>" in text and stem.removeprefix("slice_") in text
            else:
                assert (stem if name.endswith(".png") else name) in text, (command, name)
