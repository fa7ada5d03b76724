"""``config.search``: samplers, pruners and callbacks by name, as config validation and the study
loop both build them."""

from __future__ import annotations

import optuna
import pytest

from sassha_tune.config.search import BUILTIN_CALLBACKS, parse_callbacks, pruner_by_name, resolve_pruner
from sassha_tune.study.samplers import EarlyRungsOnly, make_pruner


@pytest.mark.parametrize(("name", "kind"), [
    ("none", optuna.pruners.NopPruner),
    ("median", optuna.pruners.MedianPruner),
    ("hyperband", optuna.pruners.HyperbandPruner),
    ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
])
def test_each_pruner_name_is_optunas_pruner(name, kind):
    assert type(pruner_by_name(name, {}, max_resource=12)) is kind


def test_hyperband_judges_up_to_the_trials_epochs_unless_told_otherwise():
    assert pruner_by_name("hyperband", {}, max_resource=12)._max_resource == 12  # noqa: SLF001
    assert pruner_by_name("hyperband", {"max_resource": 5}, max_resource=12)._max_resource == 5  # noqa: SLF001


@pytest.mark.parametrize(("name", "options", "message"), [
    ("none", {"n_startup_trials": 1}, "pruner none takes no options"),
    ("auto", {}, "unknown pruner 'auto'"),  # resolve_pruner's choice, never auto itself
    ("nope", {}, "unknown pruner 'nope'"),
])
def test_a_pruner_that_cannot_be_built_says_why(name, options, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        pruner_by_name(name, options, max_resource=10)


def test_only_autos_successive_halving_stops_judging_at_half_the_epochs():
    assert resolve_pruner("auto", {"reduction_factor": 2}, epochs=10) == (
        "successive_halving", {"min_resource": 1, "reduction_factor": 2})
    auto = make_pruner("auto", {}, max_resource=10)
    assert isinstance(auto, EarlyRungsOnly) and auto.last_step == 5
    assert type(make_pruner("successive_halving", {}, max_resource=10)) is optuna.pruners.SuccessiveHalvingPruner
    assert type(make_pruner("auto", {}, max_resource=10, can_prune=False)) is optuna.pruners.NopPruner


def _fail(path, expected, got):
    return ValueError(f"{path}: expected {expected}, got {got!r}")


def test_callbacks_are_parsed_into_names_and_options():
    assert parse_callbacks(None, _fail) == []
    assert parse_callbacks(["mlflow", {"name": "pkg.mod:make", "options": {"a": 1}}], _fail) == [
        {"name": "mlflow", "options": {}}, {"name": "pkg.mod:make", "options": {"a": 1}}]


@pytest.mark.parametrize(("raw", "message"), [
    ("mlflow", "study.callbacks: expected a list of callbacks"),
    ([{"options": {}}], "study.callbacks[0]: expected a name, or a mapping with name and options"),
    (["mlflow", "mlfow"], f"study.callbacks[1].name: expected one of {', '.join(BUILTIN_CALLBACKS)} or a"),
    ([{"name": "wandb", "options": [1]}], "study.callbacks[0].options: expected a mapping of keyword arguments"),
])
def test_a_malformed_callback_names_its_entry(raw, message):
    with pytest.raises(ValueError) as info:
        parse_callbacks(raw, _fail)
    assert str(info.value).startswith(message)
