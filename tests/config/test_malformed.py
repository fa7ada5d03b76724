"""Malformed configs: each one is refused by ``run`` before anything is stored.

Every case asserts exit code 2, one ``error:`` line naming the key, no database file created in a
fresh directory, and an existing database byte-identical afterwards. The cases stop at validation
or at the data check before creation (no trial is trained), so the file stays fast.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from sassha_tune.app.cli import app

BASE = {
    "study": {"name": "mal"},
    "budget": {"n_trials": 1},
    "task": {"dataset": "mnist1d", "model": "mlp", "epochs": 1, "max_steps_per_epoch": 2},
    "optimizer": {"name": "sassha", "search_space": {"params": {"lr": {"type": "float", "low": 0.01, "high": 0.3}}}},
    "device": "cpu",
}

DELETE = object()


def _set(d: dict, path: str, value) -> dict:
    d = copy.deepcopy(d)
    keys = path.split(".")
    node = d
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return d


def _space(**params) -> dict:
    return {"params": params}


# (id, path, value, key named in the error). A path of "" means: value is the whole config text.
CASES = [
    # optimizer.fixed: what the optimizer itself refuses
    ("lr-negative", "optimizer.fixed", {"lr": -0.1}, "optimizer.fixed.lr"),
    ("lr-string", "optimizer.fixed", {"lr": "fast"}, "optimizer.fixed.lr"),
    ("lr-inf", "optimizer.fixed", {"lr": float("inf")}, "optimizer.fixed.lr"),
    ("lr-nan", "optimizer.fixed", {"lr": float("nan")}, "optimizer.fixed.lr"),
    ("lr-bool", "optimizer.fixed", {"lr": True}, "optimizer.fixed.lr"),
    ("lazy-hessian-0", "optimizer.fixed", {"lazy_hessian": 0}, "optimizer.fixed.lazy_hessian"),
    ("lazy-hessian-float", "optimizer.fixed", {"lazy_hessian": 2.5}, "optimizer.fixed.lazy_hessian"),
    ("rho-negative", "optimizer.fixed", {"rho": -0.2}, "optimizer.fixed.rho"),
    ("eps-negative", "optimizer.fixed", {"eps": -1e-8}, "optimizer.fixed.eps"),
    ("wd-string", "optimizer.fixed", {"lr": 0.1, "weight_decay": "lots"}, "optimizer.fixed.weight_decay"),
    ("beta1-above-1", "optimizer.fixed", {"beta1": 1.5}, "optimizer.fixed.beta1"),
    ("beta2-negative", "optimizer.fixed", {"beta2": -0.5}, "optimizer.fixed.beta2"),
    ("hessian-power-negative", "optimizer.fixed", {"hessian_power": -1}, "optimizer.fixed.hessian_power"),
    ("unknown-hyperparameter", "optimizer.fixed", {"lrr": 0.1}, "optimizer.fixed.lrr"),
    ("fixed-a-list", "optimizer.fixed", [0.1, 0.2], "optimizer.fixed"),
    ("fixed-nested-object", "optimizer.fixed", {"lr": {"a": [1, {"b": None}]}}, "optimizer.fixed.lr"),
    ("sgd-momentum-negative", "optimizer", {"name": "sgd", "fixed": {"momentum": -0.9}}, "optimizer.fixed.momentum"),
    ("adamw-betas-above-1", "optimizer", {"name": "adamw", "fixed": {"beta2": 1.2}}, "optimizer.fixed.beta2"),
    # search-space bounds, asked of the optimizer the same way
    ("space-lr-low-negative", "optimizer.search_space", _space(lr={"type": "float", "low": -1.0, "high": 0.1}),
     "optimizer.search_space.params.lr.low"),
    ("space-rho-high-string", "optimizer.search_space", _space(rho={"type": "float", "low": 0.01, "high": "x"}),
     "optimizer.search_space.params.rho.high"),
    ("space-lr-choices-string", "optimizer.search_space", _space(lr={"type": "categorical", "choices": ["a", "b"]}),
     "optimizer.search_space.params.lr.choices"),
    ("space-low-inf", "optimizer.search_space", _space(lr={"type": "float", "low": float("-inf"), "high": 0.1}),
     "optimizer.search_space.params.lr.low"),
    ("space-eps-low-negative", "optimizer.search_space", _space(eps={"type": "float", "low": -1e-3, "high": 1e-3}),
     "optimizer.search_space.params.eps.low"),
    ("space-beta1-high", "optimizer.search_space", _space(beta1={"type": "float", "low": 0.5, "high": 1.5}),
     "optimizer.search_space.params.beta1.high"),
    ("space-lazy-hessian-0", "optimizer.search_space", _space(lazy_hessian={"type": "int", "low": 0, "high": 5}),
     "optimizer.search_space.params.lazy_hessian.low"),
    ("space-low-above-high", "optimizer.search_space", _space(lr={"type": "float", "low": 0.5, "high": 0.1}),
     "optimizer.search_space.params.lr"),
    ("space-a-number", "optimizer.search_space", 3, "optimizer.search_space"),
    ("space-unknown-name", "optimizer.search_space", "no_such_space", "optimizer.search_space"),
    ("space-empty-params", "optimizer.search_space", {"params": {}}, "optimizer.search_space.params"),
    ("space-wrong-type", "optimizer.search_space", _space(lr={"type": "gaussian", "low": 0, "high": 1}),
     "optimizer.search_space.params.lr.type"),
    # model and dataset options of the wrong type; plug-ins that are not there
    ("model-options-hidden-string", "task.model_options", {"hidden": "wide"}, "task.model_options.hidden"),
    ("model-options-unknown", "task.model_options", {"hiden": 3}, "task.model_options.hiden"),
    ("model-options-a-list", "task.model_options", [1, 2], "task.model_options"),
    ("dataset-options-max-train-string", "task.dataset_options", {"max_train": "many"}, "task.dataset_options.max_train"),
    ("dataset-options-unknown", "task.dataset_options", {"maxtrain": 5}, "task.dataset_options.maxtrain"),
    ("model-plugin-missing-module", "task.model", "no_such_module_xyz:build", "task.model"),
    ("model-plugin-missing-function", "task.model", "plugins_example:no_such_factory", "task.model"),
    ("dataset-plugin-missing-module", "task", {**BASE["task"], "dataset": "custom",
                                               "dataset_options": {"factory": "no_such_module_xyz:make"}},
     "task.dataset_options.factory"),
    ("dataset-plugin-without-factory", "task", {**BASE["task"], "dataset": "custom"}, "task.dataset_options.factory"),
    ("dataset-plugin-length-mismatch", "task", {**BASE["task"], "dataset": "custom", "model": "plugins_example:tiny_linear",
                                                "dataset_options": {"factory": "plugins_example_bad:mismatched"}},
     "task.dataset_options.factory"),
    ("dataset-plugin-labels-out-of-range", "task", {**BASE["task"], "dataset": "custom",
                                                    "model": "plugins_example:tiny_linear",
                                                    "dataset_options": {"factory": "plugins_example_bad:bad_labels"}},
     "task.dataset_options.factory"),
    ("dataset-plugin-returns-a-list", "task", {**BASE["task"], "dataset": "custom",
                                               "model": "plugins_example:tiny_linear",
                                               "dataset_options": {"factory": "plugins_example_bad:a_list"}},
     "task.dataset_options.factory"),
    ("model-wrong-for-data", "task.model", "resnet20", "task.model"),
    ("unknown-dataset", "task.dataset", "imagenet", "task.dataset"),
    ("unknown-model", "task.model", "resnet21", "task.model"),
    # numbers: finite, in range
    ("seed-beyond-2**63", "seed", 2**63, "seed"),
    ("seed-negative", "seed", -1, "seed"),
    ("seed-string", "seed", "zero", "seed"),
    ("sampler-seed-huge", "study.sampler", {"name": "tpe", "seed": 2**64}, "study.sampler.seed"),
    ("metrics-seed-huge", "metrics.seed", 2**70, "metrics.seed"),
    ("val-fraction-tiny", "task.val_fraction", 1e-9, "task.val_fraction"),
    ("val-fraction-one", "task.val_fraction", 1.0, "task.val_fraction"),
    ("stale-after-inf", "study.stale_after", float("inf"), "study.stale_after"),
    ("heartbeat-1e20", "study.heartbeat_interval", 1e20, "study.heartbeat_interval"),
    ("heartbeat-zero", "study.heartbeat_interval", 0, "study.heartbeat_interval"),
    ("stale-below-heartbeat", "study", {"name": "mal", "heartbeat_interval": 30, "stale_after": 10}, "study.stale_after"),
    ("timeout-nan", "budget.timeout", float("nan"), "budget.timeout"),
    ("timeout-inf", "budget.timeout", float("inf"), "budget.timeout"),
    ("n-trials-zero", "budget.n_trials", 0, "budget.n_trials"),
    ("n-trials-float", "budget.n_trials", 2.5, "budget.n_trials"),
    ("epochs-bool", "task.epochs", True, "task.epochs"),
    ("batch-size-negative", "task.batch_size", -8, "task.batch_size"),
    ("label-noise-inf", "task.label_noise", float("inf"), "task.label_noise"),
    ("grad-clip-negative", "optimizer.grad_clip", -1.0, "optimizer.grad_clip"),
    ("gamma-nan", "schedule.gamma", float("nan"), "schedule.gamma"),
    ("budget-lambda-tol-inf", "metrics.budget", {"lambda_tol": float("inf")}, "metrics.budget.lambda_tol"),
    # names: printable, no control characters, within the storage's limits
    ("name-trailing-newline", "study.name", "mal\n", "study.name"),
    ("name-tab", "study.name", "a\tb", "study.name"),
    ("name-nul", "study.name", "a\x00b", "study.name"),
    ("name-escape", "study.name", "a\x1b[31mb", "study.name"),
    ("name-too-long", "study.name", "x" * 600, "study.name"),
    ("name-129", "study.name", "x" * 129, "study.name"),
    ("name-a-number", "study.name", 42, "study.name"),
    ("name-slash", "study.name", "../etc", "study.name"),
    ("name-space", "study.name", "my study", "study.name"),
    # sampler, pruner and structure
    ("sampler-option-unknown", "study.sampler", {"name": "tpe", "options": {"n_startup": 3}}, "study.sampler.options.n_startup"),
    ("pruner-option-unknown", "study.pruner", {"name": "median", "options": {"warmup": 1}}, "study.pruner.options.warmup"),
    ("sampler-unknown", "study.sampler", "bayes", "study.sampler.name"),
    ("unknown-top-key", "optimiser", {"name": "sassha"}, "optimiser"),
    ("optimizer-unknown", "optimizer.name", "lion", "optimizer.name"),
    ("storage-a-list", "study.storage", ["postgresql://u:hunter2@h/db"], "study.storage"),
    ("storage-a-mapping", "study.storage", {"url": "postgresql://u:hunter2@h/db"}, "study.storage"),
    ("device-unknown", "device", "tpu", "device.name"),
]


@pytest.fixture(scope="module")
def existing_db(tmp_path_factory) -> Path:
    """A storage with one study and a finished trial in it (what a user's database holds)."""
    path = tmp_path_factory.mktemp("existing") / "existing.db"
    study = optuna.create_study(study_name="keep", storage=f"sqlite:///{path}", direction="maximize")
    study.set_user_attr("config", {"anything": 1})
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    return path


@pytest.fixture(scope="module", autouse=True)
def _bad_plugins(tmp_path_factory):
    """Dataset plug-ins that return bad data (importable by this process only)."""
    import sys

    folder = tmp_path_factory.mktemp("plugins")
    (folder / "plugins_example_bad.py").write_text(
        "import numpy as np\n"
        "def mismatched(*, data_dir=None, seed=0):\n"
        "    return {'x_train': np.zeros((20, 4)), 'y_train': np.zeros(19, int),\n"
        "            'x_test': np.zeros((5, 4)), 'y_test': np.zeros(5, int)}\n"
        "def bad_labels(*, data_dir=None, seed=0):\n"
        "    return {'x_train': np.zeros((20, 4)), 'y_train': np.arange(20), 'num_classes': 3,\n"
        "            'x_test': np.zeros((5, 4)), 'y_test': np.zeros(5, int)}\n"
        "def a_list(*, data_dir=None, seed=0):\n"
        "    return [1, 2, 3]\n"
    )
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))


def _invoke(tmp_path: Path, data: dict, storage: str) -> tuple[int, str, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=False), encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(path), "--storage", storage])
    return result.exit_code, result.stdout, result.stderr


def _assert_refused(code: int, stdout: str, stderr: str, key: str) -> None:
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    assert f": {key}" in lines[0], (key, lines[0])
    assert "hunter2" not in stdout + stderr


@pytest.mark.parametrize(("path", "value", "key"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_config_is_refused_before_anything_is_stored(tmp_path, existing_db, monkeypatch, path, value, key):
    monkeypatch.chdir(tmp_path)
    data = _set(BASE, path, value)
    fresh = tmp_path / "fresh.db"
    _assert_refused(*_invoke(tmp_path, data, f"sqlite:///{fresh}"), key)
    assert not fresh.exists() and not (tmp_path / "sassha-tune.db").exists()
    db = tmp_path / "existing.db"
    shutil.copyfile(existing_db, db)
    before = db.read_bytes()
    _assert_refused(*_invoke(tmp_path, data, f"sqlite:///{db}"), key)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "existing.db"]


def test_a_config_without_a_name_is_refused_where_studies_exist(tmp_path, existing_db, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _set(BASE, "study.name", DELETE)
    db = tmp_path / "existing.db"
    shutil.copyfile(existing_db, db)
    before = db.read_bytes()
    code, out, errs = _invoke(tmp_path, data, f"sqlite:///{db}")
    _assert_refused(code, out, errs, "study.name")
    assert "keep" in errs  # names the studies there
    assert db.read_bytes() == before


def test_malformed_case_count():
    assert len(CASES) + 1 >= 60


# --------------------------------------------------------------------------------------------
# The exact line (issue 23): every value named by its own key, a file the config refers to named
# by the key that refers to it, and never its content. Files the cases refer to lie next to the
# config ({dir} in a message).

SYNTHETIC_IMAGES = {**BASE["task"], "dataset": "synthetic", "dataset_options": {"n": 40, "n_test": 8, "shape": [3, 8, 8]}}
TEXT = {"dataset": "text", "data_dir": ".", "model": "gpt", "epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2,
        "dataset_options": {"block_size": 8}}
FILES = {
    "corpus.txt": "the quick brown fox jumps over the lazy dog. " * 40,
    "not_yaml.yaml": "token: hunter2\nparams: [\n  lr: {\n",
    "plain.yaml": "password=hunter2\n",
    "params_text.yaml": "params: hunter2\n",
    "not_hyperparameter.yaml": "params:\n  lrr: hunter2\n",
    "bad_low.yaml": "params:\n  lr: {type: float, low: x, high: 1.0}\n",
}

# (id, path, value, the line after "error: CONFIG: ")
EXACT = [
    # task options, each value checked under its key (types from the builders' signatures)
    ("resnet-width-negative", "task", {**SYNTHETIC_IMAGES, "model": "resnet20", "model_options": {"width": -3}},
     "task.model_options.width: expected an integer >= 1, got -3 (int)"),
    ("mlp-hidden-not-integers", "task.model_options", {"hidden": ["x"]},
     "task.model_options.hidden: expected a list of integers >= 1, got ['x'] (list)"),
    ("cnn-channels-one", "task", {**SYNTHETIC_IMAGES, "model": "cnn", "model_options": {"channels": [8]}},
     "task.model_options.channels: expected a list of 2 integers >= 1, got [8] (list)"),
    ("vit-dropout-above-1", "task", {**BASE["task"], "model": "vit", "model_options": {"dropout": 1.5}},
     "task.model_options.dropout: expected a number >= 0 and < 1, got 1.5 (float)"),
    ("max-train-negative", "task.dataset_options", {"max_train": -5},
     "task.dataset_options.max_train: expected an integer >= 1, got -5 (int)"),
    ("max-train-string", "task.dataset_options", {"max_train": "many"},
     "task.dataset_options.max_train: expected an integer >= 1, got 'many' (str)"),
    ("synthetic-n-negative", "task", {**SYNTHETIC_IMAGES, "dataset_options": {"n": -5}},
     "task.dataset_options.n: expected an integer >= 1, got -5 (int)"),
    ("mnist1d-args-unknown", "task.dataset_options", {"args": {"num_sample": 3}},
     "task.dataset_options.args.num_sample: unknown key (did you mean 'num_samples'?)"),
    ("plugin-dataset-max-train-negative", "task",
     {**BASE["task"], "dataset": "custom", "model": "plugins_example:tiny_linear",
      "dataset_options": {"factory": "plugins_example:blobs", "max_train": -1}},
     "task.dataset_options.max_train: expected an integer >= 1, got -1 (int)"),
    ("text-block-size-negative", "task", {**TEXT, "dataset_options": {"block_size": -4}},
     "task.dataset_options.block_size: expected an integer >= 1, got -4 (int)"),
    ("text-test-fraction-leaves-no-text", "task", {**TEXT, "val_fraction": 0.5, "dataset_options": {"test_fraction": 0.5}},
     "task.dataset_options.test_fraction: expected a fraction < 0.5 (with task.val_fraction 0.5, some text must be "
     "left to train on), got 0.5 (float)"),
    ("gpt-heads-do-not-divide", "task", {**TEXT, "model_options": {"n_head": 5}},
     "task.model_options: model 'gpt' could not be built: gpt: n_embd 128 must be divisible by n_head 5"),
    ("data-dir-without-the-data", "task", {**BASE["task"], "dataset": "cifar10", "model": "resnet20", "data_dir": "nowhere"},
     "task.data_dir: CIFAR-10 not found: no cifar-10-batches-py/data_batch_1 under {dir}/nowhere; download the python "
     "version from https://www.cs.toronto.edu/~kriz/cifar.html, extract it there, or set task.data_dir"),
    # optimizer.fixed: a fixed tuple of the wrong length; every value blamed on its own key
    ("betas-three", "optimizer.fixed", {"betas": [0.9, 0.99, 0.1]},
     "optimizer.fixed.betas: expected a list of 2 numbers, got [0.9, 0.99, 0.1] (list)"),
    ("adamw-betas-one", "optimizer", {"name": "adamw", "fixed": {"betas": [0.9]}},
     "optimizer.fixed.betas: expected a list of 2 numbers, got [0.9] (list)"),
    ("sam-sgd-rho-after-a-good-lr", "optimizer", {"name": "sam_sgd", "fixed": {"lr": 0.1, "rho": -0.5}},
     "optimizer.fixed.rho: -0.5 is refused by sam_sgd: Invalid rho: -0.5 (expected >= 0)"),
    # a search-space file: named under optimizer.search_space, its content not shown
    ("space-file-not-yaml", "optimizer.search_space", "not_yaml.yaml",
     "optimizer.search_space: {dir}/not_yaml.yaml: not valid YAML (line 4, column 1)"),
    ("space-file-plain-text", "optimizer.search_space", "plain.yaml",
     "optimizer.search_space: {dir}/plain.yaml: expected a mapping with params, got text"),
    ("space-file-params-text", "optimizer.search_space", "params_text.yaml",
     "optimizer.search_space: {dir}/params_text.yaml: params: expected a non-empty mapping of parameters, got text"),
    ("space-file-not-a-hyperparameter", "optimizer.search_space", "not_hyperparameter.yaml",
     "optimizer.search_space: {dir}/not_hyperparameter.yaml: params.lrr: not a sassha hyperparameter "
     "(did you mean 'lr'?)"),
    ("space-file-bad-bound", "optimizer.search_space", "bad_low.yaml",
     "optimizer.search_space: {dir}/bad_low.yaml: params.lr.low: expected a number, got 'x'"),
    # sampler and pruner options, asked of Optuna's constructors key by key
    ("sampler-startup-string", "study.sampler", {"name": "tpe", "options": {"n_startup_trials": "x"}},
     "study.sampler.options.n_startup_trials: expected a number, got 'x' (str)"),
    ("sampler-gamma-string", "study.sampler", {"name": "tpe", "options": {"gamma": "x"}},
     "study.sampler.options.gamma: expected a Python object (Callable), which a config cannot give, got 'x' (str)"),
    ("sampler-multivariate-string", "study.sampler", {"name": "tpe", "options": {"multivariate": "yes"}},
     "study.sampler.options.multivariate: expected true or false, got 'yes' (str)"),
    ("pruner-reduction-string", "study.pruner", {"name": "hyperband", "options": {"reduction_factor": "x"}},
     "study.pruner.options.reduction_factor: expected a number, got 'x' (str)"),
    ("pruner-option-unknown-by-name", "study.pruner", {"name": "median", "options": {"n_warmup": 1}},
     "study.pruner.options.n_warmup: unknown option (did you mean 'n_warmup_steps'?)"),
]


@pytest.mark.parametrize(("path", "value", "line"), [c[1:] for c in EXACT], ids=[c[0] for c in EXACT])
def test_malformed_config_gets_its_exact_line(tmp_path, existing_db, monkeypatch, path, value, line):
    monkeypatch.chdir(tmp_path)
    for name, text in FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    expected = f"error: {tmp_path / 'cfg.yaml'}: " + line.replace("{dir}", str(tmp_path.resolve()))
    data = _set(BASE, path, value)
    db = tmp_path / "existing.db"
    shutil.copyfile(existing_db, db)
    before, files = db.read_bytes(), sorted(p.name for p in tmp_path.iterdir())
    fresh = tmp_path / "fresh.db"
    for storage in (fresh, db):
        code, out, err = _invoke(tmp_path, data, f"sqlite:///{storage}")
        _assert_refused(code, out, err, path.split(".")[0])
        assert err.strip() == expected
    assert not fresh.exists() and db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*files, "cfg.yaml"})
