"""Config schema: valid configs load with their defaults; malformed ones fail through the real CLI
with exit code 2, one line naming the key, and nothing created."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.config import config_from_dict, config_to_dict, load_config
from sassha_tune.errors import ConfigError

BASE = {
    "study": {"name": "cfgtest"},
    "budget": {"n_trials": 2},
    "task": {"dataset": "mnist1d", "model": "mlp", "epochs": 1, "max_steps_per_epoch": 2},
    "optimizer": {"name": "sassha"},
}


def _write(tmp_path: Path, data, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return p


def _with(path: str, value):
    """BASE with ``value`` at the dotted ``path`` (value ``...`` deletes the key)."""
    d = copy.deepcopy(BASE)
    keys = path.split(".")
    node = d
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is ...:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return d


def test_minimal_config_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.study.name == "cfgtest"
    assert cfg.study.objectives[0].metric == "val_acc" and cfg.study.objectives[0].direction == "maximize"
    assert cfg.study.sampler.name == "auto" and cfg.study.pruner.name == "auto"
    assert cfg.study.diverged_as_pruned is True
    assert cfg.budget.n_trials == 2 and cfg.budget.timeout is None
    assert cfg.schedule.name == "multistep" and cfg.schedule.milestones == [0.5, 0.75]
    assert cfg.metrics.sharpness is True and cfg.metrics.subset_size == 1024
    assert cfg.device.name == "auto" and cfg.seed == 0
    assert cfg.optimizer.enqueue_published == "auto"
    # none of the settings whose default changed in issue 24 is written: a stored study keeps its own
    assert cfg.implicit == {"study.sampler", "study.pruner", "study.diverged_as_pruned",
                            "optimizer.enqueue_published", "optimizer.search_space"}


def test_unwritten_settings_get_the_schemas_defaults():
    """Validation takes every default from the schema's dataclasses (and the settings whose default
    changed from IMPLICIT_DEFAULTS): a config that writes nothing optional is the dataclasses'."""
    from sassha_tune.config.schema import (
        IMPLICIT_DEFAULTS,
        BudgetConfig,
        DeviceConfig,
        MetricsConfig,
        OptimizerConfig,
        ScheduleConfig,
        StudyConfig,
        TaskConfig,
        field_defaults,
    )

    cfg = config_from_dict({"task": {"dataset": "mnist1d", "model": "mlp"}, "optimizer": {"name": "sassha"}})
    assert (cfg.budget, cfg.schedule, cfg.metrics, cfg.device) == (BudgetConfig(), ScheduleConfig(), MetricsConfig(),
                                                                   DeviceConfig())
    assert cfg.task == TaskConfig("mnist1d", "mlp", eval_batch_size=cfg.task.eval_batch_size)  # derived from batch_size
    assert cfg.optimizer == OptimizerConfig("sassha", enqueue_published=IMPLICIT_DEFAULTS["optimizer.enqueue_published"])
    study = StudyConfig("sassha-tune", diverged_as_pruned=IMPLICIT_DEFAULTS["study.diverged_as_pruned"])
    study.sampler.name, study.pruner.name = IMPLICIT_DEFAULTS["study.sampler"], IMPLICIT_DEFAULTS["study.pruner"]
    assert cfg.study == study and cfg.seed == field_defaults(type(cfg))["seed"]
    first, second = field_defaults(TaskConfig), field_defaults(TaskConfig)
    assert first["dataset_options"] == {} and first["dataset_options"] is not second["dataset_options"]
    assert "dataset" not in first  # no default: required


def test_a_parameter_fixed_with_the_default_space_is_not_searched(tmp_path):
    """A named space must not search what the config fixes (an error, above); the default space,
    which the config did not choose, simply leaves it out."""
    from sassha_tune.config.spaces import space_for_config

    cfg = load_config(_write(tmp_path, _with("optimizer.fixed", {"lr": 0.1, "rho": 0.05})))
    space = space_for_config(cfg, check_fixed=True)
    assert "lr" not in space.params and "rho" not in space.params and "eps" in space.params


def test_study_name_defaults_to_file_stem(tmp_path):
    d = copy.deepcopy(BASE)
    del d["study"]
    cfg = load_config(_write(tmp_path, d, "my-study.yaml"))
    assert cfg.study.name == "my-study"


def test_floats_without_dot_and_two_objectives(tmp_path):
    text = """
study:
  name: two
  objectives: [val_acc, {metric: lambda_max, direction: minimize}]
task: {dataset: mnist1d, model: mlp}
optimizer:
  name: sassha
  fixed: {betas: [0.9, 0.999]}
  search_space:
    params:
      lr: {type: float, low: 1e-3, high: 1e-1, log: true}
"""
    cfg = load_config(_write(tmp_path, text))
    assert cfg.study.directions == ["maximize", "minimize"]
    assert cfg.optimizer.search_space["params"]["lr"]["low"] == pytest.approx(1e-3)


def test_roundtrip_through_plain_dict(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    again = config_from_dict(config_to_dict(cfg), source="stored")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_relative_data_dir_is_relative_to_the_config(tmp_path):
    cfg = load_config(_write(tmp_path, _with("task.data_dir", "data")))
    assert cfg.task.data_dir == str((tmp_path / "data").resolve())


INLINE_BAD_RANGE = {"params": {"lr": {"type": "float", "low": 1.0, "high": 0.1}}}
INLINE_BAD_LOG = {"params": {"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}
INLINE_BAD_K = {"params": {"lazy_hessian": {"type": "int", "low": 0, "high": 10}}}
INLINE_BAD_PUBLISHED = {
    "params": {"lr": {"type": "float", "low": 0.01, "high": 0.1}},
    "published": [{"source": "x", "lr": 0.5}],
}

MALFORMED = [
    ("unknown-top", {**BASE, "studdy": {}}, ["studdy", "did you mean 'study'"]),
    ("unknown-study-key", _with("study.samplr", "tpe"), ["study.samplr", "sampler"]),
    ("missing-task", _with("task", ...), ["task"]),
    ("missing-dataset", _with("task.dataset", ...), ["task.dataset"]),
    ("epochs-str", _with("task.epochs", "ten"), ["task.epochs", "integer"]),
    ("epochs-zero", _with("task.epochs", 0), ["task.epochs", ">= 1"]),
    ("batch-float", _with("task.batch_size", 1.5), ["task.batch_size"]),
    ("label-noise", _with("task.label_noise", 1.5), ["task.label_noise"]),
    ("val-fraction", _with("task.val_fraction", 0), ["task.val_fraction"]),
    ("augment", _with("task.augment", "yes please"), ["task.augment"]),
    ("dataset-typo", _with("task.dataset", "mnist1"), ["task.dataset", "mnist1d"]),
    ("model-typo", _with("task.model", "resnet"), ["task.model"]),
    ("optimizer-typo", _with("optimizer.name", "sasha"), ["optimizer.name", "did you mean 'sassha'"]),
    ("fixed-typo", _with("optimizer.fixed", {"rhoo": 0.1}), ["optimizer.fixed.rhoo", "rho"]),
    ("space-missing", _with("optimizer.search_space", "nope"), ["optimizer.search_space", "nope"]),
    ("space-range", _with("optimizer.search_space", INLINE_BAD_RANGE), ["optimizer.search_space.params.lr", "low < high"]),
    ("space-log", _with("optimizer.search_space", INLINE_BAD_LOG), ["optimizer.search_space.params.lr.low"]),
    ("space-k", _with("optimizer.search_space", INLINE_BAD_K), ["params.lazy_hessian.low", "k >= 1"]),
    ("space-published", _with("optimizer.search_space", INLINE_BAD_PUBLISHED), ["published[0].lr"]),
    ("n-trials-zero", _with("budget.n_trials", 0), ["budget.n_trials"]),
    ("n-trials-bool", _with("budget.n_trials", True), ["budget.n_trials"]),
    ("objective-test", _with("study.objective", "test_acc"), ["study.objective"]),
    (
        "pruner-multi",
        _with("study", {"name": "x", "objectives": ["val_acc", "lambda_max"], "pruner": "median"}),
        ["study.pruner", "multi-objective"],
    ),
    ("sampler-typo", _with("study.sampler", {"name": "tpee"}), ["study.sampler.name", "tpe"]),
    ("sampler-options", _with("study.sampler", {"name": "tpe", "options": {"bogus": 1}}), ["study.sampler.options"]),
    ("milestones", _with("schedule", {"milestones": [0.75, 0.5]}), ["schedule.milestones"]),
    ("schedule-name", _with("schedule", "linear"), ["schedule.name"]),
    ("device", _with("device", "gpu"), ["device.name"]),
    ("budget-key", _with("metrics", {"budget": {"lambda_iters": 3}}), ["metrics.budget.lambda_iters", "lambda_max_iters"]),
    (
        "sharpness-off",
        _with("study", {"name": "x", "objective": "lambda_max"}) | {"metrics": {"sharpness": False}},
        ["metrics.sharpness"],
    ),
    ("study-name", _with("study.name", "has space"), ["study.name"]),
    ("stale-after", _with("study", {"name": "x", "heartbeat_interval": 10, "stale_after": 5}), ["study.stale_after"]),
    ("fixed-and-searched", _with("optimizer", {"name": "sassha", "search_space": "sassha", "fixed": {"lr": 0.1}}),
     ["optimizer.fixed.lr", "also searched"]),
    ("seed", {**BASE, "seed": -1}, ["seed"]),
    ("yaml-syntax", "study: {name: x\ntask: [", ["not valid YAML"]),
    ("top-level-list", "- a\n- b\n", ["(top level)"]),
]


@pytest.mark.parametrize(("case", "data", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_config_exits_2_with_one_line(tmp_path, monkeypatch, case, data, expected):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, data)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert "Traceback" not in result.output
    assert message.startswith("error: ")
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "sassha-tune.db").exists()  # validated before anything is created


def test_config_error_is_one_line_with_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, _with("task.epochs", "ten")))
    assert str(info.value).startswith(str(tmp_path / "cfg.yaml") + ": task.epochs: expected")


def test_missing_config_file(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2 and "no such config file" in result.stderr


# --------------------------------------------------------------------------------------------
# config_from_stored: the trusted rebuild of a validated config (studies, trial processes)


def _stored_cases(tmp_path: Path):
    """Validated configs of several shapes: every example, two objectives, every section set."""
    root = Path(__file__).resolve().parents[2]
    cases = [load_config(p) for p in sorted((root / "examples").glob("*.yaml"))]
    cases.append(config_from_dict({**BASE, "study": {"name": "two", "objectives": ["val_acc", "lambda_max"]}}))
    cases.append(config_from_dict({
        **BASE,
        "study": {"name": "all", "objective": "val_loss", "sampler": {"name": "qmc", "seed": 4, "options": {"scramble": True}},
                  "pruner": {"name": "median", "options": {"n_startup_trials": 2}}, "heartbeat_interval": 2,
                  "stale_after": 7},
        "budget": {"n_trials": 3, "timeout": 60},
        "task": {**BASE["task"], "data_dir": str(tmp_path), "label_noise": 0.2, "augment": False, "eval_batch_size": 64},
        "optimizer": {"name": "sgd", "fixed": {"momentum": 0.8}, "grad_clip": 1.5},
        "schedule": {"name": "cosine", "warmup_fraction": 0.1},
        "metrics": {"sharpness": False, "subset_size": 32},
        "device": {"name": "cpu", "amp": "bf16"},
        "seed": 9,
        "provenance": {"study": "x", "trial": 1},
    }))
    return cases


def test_config_from_stored_rebuilds_what_was_validated(tmp_path, monkeypatch):
    from dataclasses import replace

    # examples/plugin.yaml's plug-ins are imported when it is validated (as its comment says:
    # PYTHONPATH=examples)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples"))

    from sassha_tune.config import config_from_stored

    for cfg in _stored_cases(tmp_path):
        plain = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))  # plain data, as a storage keeps it
        rebuilt = config_from_stored(plain, source="stored")
        assert rebuilt == replace(cfg, source="stored", base_dir=".")
        assert config_to_dict(rebuilt) == config_to_dict(cfg)
        # what validating the same data again gives (the path it replaces)
        assert rebuilt == config_from_dict(plain, source="stored", base_dir=".")


def test_config_from_stored_fills_defaults_an_older_study_lacks(tmp_path):
    from sassha_tune.config import config_from_stored

    plain = config_to_dict(load_config(_write(tmp_path, BASE)))
    del plain["task"]["eval_batch_size"], plain["device"]["processes"], plain["metrics"]
    cfg = config_from_stored(plain)
    assert cfg.task.eval_batch_size == 256 and cfg.device.processes == 1 and cfg.metrics.subset_size == 1024
    assert cfg == config_from_dict(plain, source="<stored config>")


def test_config_from_stored_does_not_validate(tmp_path):
    from sassha_tune.config import config_from_stored

    # a search-space name only validation resolves: the trusted rebuild never looks it up
    plain = config_to_dict(load_config(_write(tmp_path, BASE)))
    plain["optimizer"]["search_space"] = "no_such_space"
    with pytest.raises(ConfigError, match="no_such_space"):
        config_from_dict(plain)
    assert config_from_stored(plain).optimizer.search_space == "no_such_space"
