"""Config checks: every config mistake is one line, exit code 2, at load time, nothing created.

metrics.budget values, dataset/model option names, weight decay without lr, duplicate YAML keys,
grad clip and schedules for every optimizer, enqueue_published as a list of sources."""

from __future__ import annotations

import copy
import glob
import inspect
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sassha_tune import config as config_mod
from sassha_tune.app.cli import app
from sassha_tune.config import config_from_dict, config_to_dict, load_config, published_to_enqueue
from sassha_tune.config.spaces import space_for_config
from sassha_tune.errors import ConfigError
from sassha_tune.training import trainer
from sassha_tune.training.data import DATASETS, dataset_option_names
from sassha_tune.training.models import (
    MODELS,
    build_model,
    is_language_model,
    model_option_names,
    model_option_parameters,
)

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "study": {"name": "checks"},
    "budget": {"n_trials": 1},
    "task": {"dataset": "mnist1d", "model": "mlp", "epochs": 1, "max_steps_per_epoch": 2},
    "optimizer": {"name": "sassha"},
}

LR_ONLY_SPACE = {"params": {"lr": {"type": "float", "low": 0.01, "high": 0.1}}}
RHO_ONLY_SPACE = {"params": {"rho": {"type": "float", "low": 0.01, "high": 0.1}}}
WD_ONLY_SPACE = {"params": {"weight_decay": {"type": "float", "low": 1e-5, "high": 1e-3}}}


def _with(path: str, value):
    d = copy.deepcopy(BASE)
    keys = path.split(".")
    node = d
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return d


def _run_cli(tmp_path: Path, data, monkeypatch) -> tuple[str, Path]:
    """Run ``run CONFIG`` on ``data`` with a sqlite storage in tmp_path; return (stderr line, db path)."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "study.db"
    if isinstance(data, str):
        text = data.replace("STORAGE", f"sqlite:///{db}")
    else:
        data = copy.deepcopy(data)
        data.setdefault("study", {})["storage"] = f"sqlite:///{db}"
        text = yaml.safe_dump(data)
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert message.startswith(f"error: {path}: "), message
    assert not db.exists()
    assert not (tmp_path / "sassha-tune.db").exists()
    return message, db


# --------------------------------------------------------------------------------------------
# Metrics.budget values

BAD_BUDGETS = [
    ("lambda_method", "foo", ["lanczos", "power"]),
    ("lambda_method", 3, ["lanczos"]),
    ("lambda_tol", 0, ["> 0"]),
    ("lambda_tol", "small", ["a number"]),
    ("lambda_max_iters", -1, [">= 0"]),
    ("lambda_max_iters", 2.5, ["an integer"]),
    ("trace_probes", "ten", ["an integer"]),
    ("trace_probes", True, ["an integer"]),
    ("trace_batch_size", 0, [">= 1"]),
    ("chunk_size", 0, [">= 1"]),
    ("chunk_size", "big", ["an integer"]),
    ("sam_rho", -0.1, [">= 0"]),
    ("adaptive_rho", "x", ["a number"]),
    ("sam_steps", -2, [">= 0"]),
    ("ascent_step", 0, ["> 0", "<= 1"]),
    ("ascent_step", 1.5, ["<= 1"]),
    ("average_sigma", 0, ["> 0"]),
    ("average_samples", 0, [">= 1"]),
    ("average_adaptive", "yes", ["true or false"]),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_BUDGETS, ids=[f"{k}={v!r}" for k, v, _ in BAD_BUDGETS])
def test_bad_budget_value_fails_at_load(tmp_path, monkeypatch, key, value, expected):
    message, _ = _run_cli(tmp_path, _with("metrics", {"budget": {key: value}}), monkeypatch)
    assert f"metrics.budget.{key}: expected" in message
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_budget_typo_still_gets_did_you_mean(tmp_path, monkeypatch):
    message, _ = _run_cli(tmp_path, _with("metrics", {"budget": {"trace_probe": 3}}), monkeypatch)
    assert "metrics.budget.trace_probe" in message and "did you mean 'trace_probes'" in message


def test_valid_budget_values_load():
    budget = {
        "chunk_size": None, "lambda_method": None, "lambda_tol": 1e-3, "lambda_max_iters": 0, "trace_probes": 0,
        "trace_batch_size": None, "sam_rho": None, "sam_steps": 0, "adaptive_rho": 0.5, "ascent_step": 1,
        "average_sigma": 0.01, "average_samples": 5, "average_adaptive": True,
    }
    cfg = config_from_dict(_with("metrics", {"budget": budget}))
    assert set(cfg.metrics.budget) == set(budget)
    assert config_from_dict(_with("metrics", {"budget": {"lambda_method": "power", "chunk_size": 64}})).metrics.budget == {
        "lambda_method": "power", "chunk_size": 64,
    }


def test_budget_keys_are_hessian_metrics_keywords():
    from sassha_tune.metrics.sharpness import hessian_metrics

    kwargs = {p.name for p in inspect.signature(hessian_metrics).parameters.values() if p.kind == p.KEYWORD_ONLY}
    assert set(config_mod.SHARPNESS_BUDGET_KEYS) == kwargs - {"seed", "subset_size"}


# --------------------------------------------------------------------------------------------
# Dataset / model options


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ({"dataset_options": {"max_trian": 10}}, ["task.dataset_options.max_trian", "did you mean 'max_train'"]),
        ({"dataset": "cifar100", "model": "resnet20", "dataset_options": {"label": "fine"}},
         ["task.dataset_options.label", "did you mean 'labels'"]),
        ({"dataset": "cifar10", "model": "resnet20", "dataset_options": {"zzz": 1}}, ["task.dataset_options.zzz", "max_train"]),
        ({"model_options": {"hiden": [8]}}, ["task.model_options.hiden", "did you mean 'hidden'"]),
        ({"model": "resnet20", "model_options": {"widht": 8}}, ["task.model_options.widht", "did you mean 'width'"]),
        ({"model": "wrn16_4", "model_options": {"drop_out": 0.1}}, ["task.model_options.drop_out", "dropout"]),
        ({"model": "vit", "model_options": {"qqq": 1}}, ["task.model_options.qqq", "patch_size"]),
        ({"dataset": "custom", "dataset_options": {}}, ["task.dataset_options.factory", "package.module:function"]),
        ({"dataset": "custom", "dataset_options": {"factory": "not a plugin"}}, ["task.dataset_options.factory"]),
        ({"model": "resnet21"}, ["task.model", "6n+2"]),
        ({"model": "wrn16_0"}, ["task.model", "6n+4"]),
    ],
)
def test_unknown_option_fails_at_load(tmp_path, monkeypatch, task, expected):
    d = copy.deepcopy(BASE)
    d["task"].update(task)
    message, _ = _run_cli(tmp_path, d, monkeypatch)
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_plugin_options_are_not_checked_but_plugins_must_import():
    d = copy.deepcopy(BASE)
    d["task"].update(
        dataset="custom",
        dataset_options={"factory": "plugins_example:blobs", "anything": 1},
        model="plugins_example:tiny_linear",
        model_options={"whatever": 2},
    )
    cfg = config_from_dict(d)  # imported (tests/plugins_example.py), its options go to it unchecked
    assert cfg.task.model_options == {"whatever": 2}
    d["task"]["model"] = "nowhere_module:build"
    with pytest.raises(ConfigError, match=r"task\.model: plug-in 'nowhere_module:build': cannot import"):
        config_from_dict(d)


def test_option_names_come_from_the_builders():
    assert model_option_names("mlp") == ("hidden",)
    assert model_option_names("resnet56") == ("width",)
    assert model_option_names("wrn28_10") == ("dropout",)
    assert "depth" in model_option_names("vit")
    assert model_option_names("pkg.mod:fn") is None
    for name in MODELS:
        names = model_option_names(name)
        assert names is not None and "input_shape" not in names and "num_classes" not in names
    assert dataset_option_names("custom") is None
    for name in DATASETS:
        if name not in ("custom", "text"):
            assert {"max_train", "max_test", "normalize"} <= set(dataset_option_names(name))
    assert dataset_option_names("text") == ("block_size", "exclude", "max_tokens", "pattern", "test_fraction")
    assert "labels" in dataset_option_names("cifar100")
    build_model("mlp", (4,), 2, hidden=[3])  # the listed option is what the builder takes


def _task(dataset: str, model: str, **options) -> dict:
    d = copy.deepcopy(BASE)
    d["task"].update(dataset=dataset, model=model, **options)
    return d


@pytest.mark.parametrize("model", MODELS)
def test_every_model_option_is_checked_by_its_own_key(model):
    """Each option of a built-in model: its default (from the signature) loads, a value of no
    option's kind is refused under the option's own key."""
    dataset = "text" if is_language_model(model) else "synthetic"
    params = model_option_parameters(model)
    assert params
    defaults = {p.name: list(p.default) if isinstance(p.default, tuple) else p.default for p in params}
    assert all(p.default is not inspect.Parameter.empty for p in params)
    config_from_dict(_task(dataset, model, model_options=defaults))
    for p in params:
        with pytest.raises(ConfigError, match=rf": task\.model_options\.{p.name}: expected "):
            config_from_dict(_task(dataset, model, model_options={p.name: [[]]}))


@pytest.mark.parametrize("dataset", [d for d in DATASETS if d != "custom"])
def test_every_dataset_option_is_checked_by_its_own_key(dataset):
    model = "gpt" if dataset == "text" else "mlp"
    for name in dataset_option_names(dataset):
        with pytest.raises(ConfigError, match=rf": task\.dataset_options\.{name}: expected "):
            config_from_dict(_task(dataset, model, dataset_options={name: [[]]}))


def test_plugin_dataset_options_checked_only_where_sassha_tune_uses_them():
    options = {"factory": "plugins_example:blobs", "max_train": 100, "max_test": 20, "normalize": False, "n": "its own"}
    config_from_dict(_task("custom", "plugins_example:tiny_linear", dataset_options=options))
    with pytest.raises(ConfigError, match=r": task\.dataset_options\.normalize: expected true or false, got 'no'"):
        config_from_dict(_task("custom", "plugins_example:tiny_linear", dataset_options={**options, "normalize": "no"}))


# --------------------------------------------------------------------------------------------
# Decoupled weight decay needs lr


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        ({"name": "sassha", "search_space": RHO_ONLY_SPACE, "fixed": {"weight_decay": 5e-4}},
         "optimizer.fixed.weight_decay"),
        ({"name": "adamw", "search_space": WD_ONLY_SPACE}, "optimizer.search_space.params.weight_decay"),
    ],
)
def test_weight_decay_without_lr_fails_at_load(tmp_path, monkeypatch, optimizer, expected):
    message, _ = _run_cli(tmp_path, _with("optimizer", optimizer), monkeypatch)
    assert expected in message and "needs lr" in message


def test_weight_decay_with_lr_or_coupled_loads():
    config_from_dict(_with("optimizer", {"name": "sassha", "search_space": LR_ONLY_SPACE, "fixed": {"weight_decay": 5e-4}}))
    config_from_dict(_with("optimizer", {"name": "adamw", "search_space": WD_ONLY_SPACE, "fixed": {"lr": 1e-3}}))
    config_from_dict(_with("optimizer", {"name": "sgd", "search_space": WD_ONLY_SPACE}))  # coupled L2


# --------------------------------------------------------------------------------------------
# Duplicate keys

DUPLICATE = """study: {name: dup, storage: STORAGE}
task: {dataset: mnist1d, model: mlp}
optimizer: {name: sassha}
task: {dataset: digits, model: mlp}
"""

NESTED_DUPLICATE = """study: {name: dup, storage: STORAGE}
task:
  dataset: mnist1d
  model: mlp
  epochs: 1
  epochs: 2
optimizer: {name: sassha}
"""


def test_duplicate_top_level_key_fails(tmp_path, monkeypatch):
    message, _ = _run_cli(tmp_path, DUPLICATE, monkeypatch)
    assert "task: duplicate key on line 4 (first on line 2)" in message


def test_duplicate_nested_key_fails(tmp_path, monkeypatch):
    message, _ = _run_cli(tmp_path, NESTED_DUPLICATE, monkeypatch)
    assert "epochs: duplicate key on line 6 (first on line 5)" in message


def test_yaml_merge_keys_may_still_override():
    data = config_mod.yaml_load("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n", "<t>")
    assert data["other"] == {"x": 3, "y": 2}


def test_duplicate_key_in_search_space_file(tmp_path):
    (tmp_path / "space.yaml").write_text(
        "params:\n  lr: {type: float, low: 0.01, high: 0.1}\n  lr: {type: float, low: 0.1, high: 1.0}\n",
        encoding="utf-8",
    )
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_with("optimizer", {"name": "sassha", "search_space": "space.yaml"})), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"space\.yaml: lr: duplicate key on line 3"):
        load_config(cfg)


# --------------------------------------------------------------------------------------------
# Grad clip for every optimizer; one list of schedules


def test_grad_clip_accepted_for_every_optimizer():
    from sassha_tune.optim.registry import OPTIMIZER_NAMES

    for name in OPTIMIZER_NAMES:
        cfg = config_from_dict(_with("optimizer", {"name": name, "grad_clip": 1.0}))
        assert cfg.optimizer.grad_clip == 1.0


def test_every_schedule_of_the_trainer_is_a_config_choice():
    for name in trainer.SCHEDULES:
        assert config_from_dict(_with("schedule", name)).schedule.name == name


# --------------------------------------------------------------------------------------------
# Enqueue_published as a list of sources


def test_enqueue_published_list_selects_sources():
    sources = ["cifar100/resnet32/sassha.sh", "cifar10/resnet20/sassha.sh"]
    cfg = config_from_dict(_with("optimizer", {"name": "sassha", "search_space": "sassha",
                                               "enqueue_published": sources}))
    space = space_for_config(cfg)
    chosen = published_to_enqueue(cfg, space)
    assert [e["source"] for e in chosen] == sources
    assert chosen[1]["lr"] == 0.15
    again = config_from_dict(config_to_dict(cfg), source="stored")
    assert again.optimizer.enqueue_published == sources


def test_enqueue_published_true_false():
    cfg = config_from_dict(_with("optimizer", {"name": "sassha", "search_space": "sassha", "enqueue_published": True}))
    space = space_for_config(cfg)
    assert published_to_enqueue(cfg, space) == space.published
    cfg = config_from_dict(_with("optimizer", {"name": "sassha", "enqueue_published": False}))
    assert published_to_enqueue(cfg, space_for_config(cfg)) == []


def test_enqueue_published_auto_is_the_prior_of_the_space_the_model_gets():
    """auto (the default): a BatchNorm ResNet starts from two published configurations; a model
    without normalization searches sassha_nonorm and starts from its dense-start configurations."""
    resnet = config_from_dict(_with("task", {**BASE["task"], "dataset": "synthetic", "model": "resnet8",
                                             "dataset_options": {"shape": [3, 8, 8]}}))
    chosen = published_to_enqueue(resnet, space_for_config(resnet))
    assert [e["source"] for e in chosen] == ["cifar10/resnet32/sassha.sh", "imagenet/resnet50/sassha.sh"]
    assert (chosen[0]["lr"], chosen[0]["rho"], chosen[0]["eps"]) == (0.15, 0.2, 1e-4)
    mlp = config_from_dict(BASE)
    space = space_for_config(mlp)
    assert Path(space.source).stem == "sassha_nonorm"
    chosen = published_to_enqueue(mlp, space)
    assert [e["source"] for e in chosen] == ["dense-start-lr0.1", "dense-start-lr0.3"]
    assert all(space.params[k].contains(v) for e in chosen for k, v in e.items() if k in space.params)
    named = config_from_dict(_with("optimizer", {"name": "sassha", "search_space": "sassha"}))
    assert Path(space_for_config(named).source).stem == "sassha"  # a named space is searched as named


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["cifar10/resnet20/sasha.sh"], ["optimizer.enqueue_published[0]", "did you mean 'cifar10/resnet20/sassha.sh'",
                                         "valid sources: cifar10/resnet20/sassha.sh, "]),
        (["cifar10/resnet20/sassha.sh", "nope"], ["optimizer.enqueue_published[1]", "'nope'"]),
        ([], ["optimizer.enqueue_published", "expected auto, true, false or a list"]),
        ("yes", ["optimizer.enqueue_published", "expected auto, true, false or a list"]),
        (["cifar10/resnet20/sassha.sh"] * 2, ["optimizer.enqueue_published", "distinct"]),
    ],
)
def test_enqueue_published_bad_list_fails(tmp_path, monkeypatch, value, expected):
    message, _ = _run_cli(tmp_path, _with("optimizer", {"name": "sassha", "search_space": "sassha",
                                                        "enqueue_published": value}), monkeypatch)
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_enqueue_published_list_with_space_without_published(tmp_path, monkeypatch):
    message, _ = _run_cli(
        tmp_path,
        _with("optimizer", {"name": "sassha", "search_space": LR_ONLY_SPACE, "enqueue_published": ["x"]}),
        monkeypatch,
    )
    assert "lists no published configurations" in message


# --------------------------------------------------------------------------------------------
# valid configs still load


@pytest.mark.parametrize(
    "path", sorted(glob.glob(str(ROOT / "examples" / "*.yaml")) + glob.glob(str(ROOT / "examples" / "compare" / "*.yaml")))
)
def test_examples_load(path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # plugin.yaml: PYTHONPATH=examples, as it says
    cfg = load_config(path)
    assert config_from_dict(config_to_dict(cfg), source="stored", base_dir=Path(path).parent)
