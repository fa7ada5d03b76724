"""The app layer's seams under the CLI (sassha_tune/app): the flags checked as typed, in one
order, before anything else; the output files checked before any work (``train_once``:
tests/cli/test_cli_train.py)."""

from __future__ import annotations

import pytest

from sassha_tune.app.flags import check_flags
from sassha_tune.app.outputs import check_output, write_output
from sassha_tune.errors import UserError


def test_flags_are_read_as_typed():
    flags = check_flags(n_trials="+3", device="cpu", pack="2", overrides=["task.epochs=2"])
    assert (flags.budget.n, flags.budget.more, flags.budget.option) == (3, True, "--n-trials")
    assert flags.gpus == [] and flags.pack == 2
    plain = check_flags()
    assert plain.budget is None and plain.gpus == [] and plain.pack == "auto"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # each bad flag named as typed; with several bad ones, the first in the order
        # --seeds, --n-trials, --gpus, --device, --pack, --set is the one refused
        ({"seeds": "1,x", "n_trials": "0"}, "--seeds"),
        ({"n_trials": "0", "gpus": "x"}, "--n-trials: expected a total number of trials >= 1"),
        ({"gpus": "0,0", "device": "gpu"}, "--gpus: GPU listed twice in '0,0'"),
        ({"device": "gpu", "pack": "two"}, "--device: expected"),
        ({"pack": "two", "overrides": ["nokey"]}, "--pack: expected auto or an integer >= 1, got 'two'"),
        ({"overrides": ["task.epochs=1", "task.epochs=2"]}, "task.epochs"),
        ({"gpus": "0", "device": "cpu"}, "--device cannot be combined with --gpus"),
    ],
)
def test_the_first_bad_flag_is_one_line_naming_it(flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("+", r"\+")):
        check_flags(**flags)


def test_an_output_file_is_checked_before_any_work(tmp_path):
    target = tmp_path / "out.json"
    (tmp_path / "link.json").symlink_to(target)
    with pytest.raises(UserError, match="--out .*link.json: is a symbolic link"):
        check_output(tmp_path / "link.json", "--out")
    with pytest.raises(UserError, match=f"--save {tmp_path}/no/m.pt: directory {tmp_path}/no does not exist"):
        check_output(tmp_path / "no" / "m.pt", "--save")
    check_output(tmp_path / "no" / "m.pt", "--save", directory=False)  # the writer names a missing folder
    write_output(target, "{}\n", "--out")
    assert target.read_text() == "{}\n"
    with pytest.raises(UserError, match="--out .*: cannot write"):
        write_output(tmp_path / "no" / "m.json", "{}", "--out")
