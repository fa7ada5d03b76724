"""Search spaces: shipped files, validation, suggestion, and the weight-decay convention."""

from __future__ import annotations

import inspect

import optuna
import pytest

from sassha_tune import optim
from sassha_tune.config import SHARPNESS_BUDGET_KEYS
from sassha_tune.config.spaces import (
    SPACES_DIR,
    load_space,
    space_from_dict,
    suggest,
    to_hparams,
)
from sassha_tune.errors import ConfigError
from sassha_tune.optim.registry import OPTIMIZER_NAMES, OPTIMIZERS


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_shipped_space_loads_and_contains_its_published_configs(name):
    space = load_space(name, name)
    assert space.optimizer == name
    assert "lr" in space.params and "weight_decay" in space.params
    assert space.published, "every shipped space lists the published configurations"
    for entry in space.published:
        for key, value in entry.items():
            if key in space.params:
                assert space.params[key].contains(value), (name, key, value)


def test_sassha_space_has_the_core_params():
    space = load_space("sassha", "sassha")
    assert set(space.params) >= {"lr", "rho", "lazy_hessian", "eps", "weight_decay"}
    k = space.params["lazy_hessian"]
    assert k.type == "int" and k.log and k.low >= 1
    assert all(space.params[n].log for n in ("lr", "rho", "eps", "weight_decay"))


def test_every_optimizer_has_a_space_file():
    assert set(OPTIMIZER_NAMES) <= {p.stem for p in SPACES_DIR.glob("*.yaml")}


def test_every_shipped_space_loads_and_names_a_real_optimizer():
    for path in SPACES_DIR.glob("*.yaml"):
        space = load_space(path.stem, None)
        assert space.optimizer in OPTIMIZER_NAMES, path.name


def test_sassha_nonorm_space_keeps_eps_floor_and_dense_start():
    space = load_space("sassha_nonorm", "sassha")
    assert space.params["eps"].low >= 1e-4
    assert list(space.params["dense_refresh_steps"].choices) == [50]


def test_weight_decay_convention_is_converted_once():
    # cifar10/resnet20/sassha.sh: lr 0.15, --wd 5e-4 -> the optimizer gets 5e-4 / 0.15
    hp = to_hparams("sassha", {"lr": 0.15, "weight_decay": 5e-4}, seed=3)
    assert hp["weight_decay"] == pytest.approx(0.0033333, rel=1e-4)
    assert hp["seed"] == 3
    # SGD and SAM-SGD take the script's wd as coupled L2
    assert to_hparams("sgd", {"lr": 0.1, "weight_decay": 5e-4})["weight_decay"] == 5e-4
    assert to_hparams("sam_sgd", {"lr": 0.1, "weight_decay": 5e-4, "rho": 0.1})["weight_decay"] == 5e-4
    # Sophia-H (cifar10/resnet20): lr 1e-3, --wd 1e-3 -> 1.0
    assert to_hparams("sophiah", {"lr": 1e-3, "weight_decay": 1e-3})["weight_decay"] == pytest.approx(1.0)
    decoupled = {name for name, info in OPTIMIZERS.items() if info.decoupled_weight_decay}
    assert decoupled == {"sassha", "msassha", "adamw", "sam_adamw", "adahessian", "sophiah", "sassha_lm"}
    # language models: weight decay as the language-model scripts pass it (as given)
    assert to_hparams("adamw", {"lr": 6e-4, "weight_decay": 0.1}, language=True)["weight_decay"] == 0.1
    assert to_hparams("sassha_lm", {"lr": 0.3, "weight_decay": 2e-4}, language=True)["weight_decay"] == 2e-4
    assert to_hparams("adamw", {"lr": 1e-3, "beta1": 0.8, "beta2": 0.99})["betas"] == (0.8, 0.99)


def test_weight_decay_without_lr_is_an_error():
    with pytest.raises(ConfigError, match="needs lr"):
        to_hparams("adamw", {"weight_decay": 1e-4})


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"lr": {"type": "float", "low": 0.1, "high": 0.1}}, "low < high"),
        ({"lr": {"type": "float", "low": -1.0, "high": 0.1, "log": True}}, "lr.low"),
        ({"lr": {"type": "floaty", "low": 0.0, "high": 0.1}}, "lr.type"),
        ({"lr": {"type": "float", "lo": 0.0, "high": 0.1}}, "did you mean 'low'"),
        ({"lazy_hessian": {"type": "int", "low": 1.5, "high": 10}}, "lazy_hessian.low"),
        ({"lazy_hessian": {"type": "int", "low": 0, "high": 10}}, "k >= 1"),
        ({"dense_refresh_steps": {"type": "int", "low": -5, "high": 10}}, "low >= 0 (steps)"),
        ({"dense_refresh_steps": {"type": "float", "low": 0.0, "high": 10.0}}, "expected type int"),
        ({"dense_refresh_steps": {"type": "categorical", "choices": [50, -1]}}, "integers >= 0"),
        ({"rho": {"type": "categorical", "choices": []}}, "rho.choices"),
        ({"rho": {"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}}, "rho.step"),
        ({"lrr": {"type": "float", "low": 0.1, "high": 1.0}}, "did you mean 'lr'"),
    ],
)
def test_invalid_space(params, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        space_from_dict({"params": params}, "space.yaml", "sassha")


def test_space_for_another_optimizer_is_refused():
    with pytest.raises(ConfigError, match="this space is for 'sgd'"):
        space_from_dict({"optimizer": "sgd", "params": {"lr": {"type": "float", "low": 0.1, "high": 1.0}}}, "s", "adamw")


def test_suggest_respects_types_and_bounds():
    space = load_space("sassha", "sassha")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = suggest(trial, space)
        for name, p in space.params.items():
            assert p.contains(params[name]), (name, params[name])
        assert isinstance(params["lazy_hessian"], int)
        study.tell(trial, 0.0)


def test_published_configs_enqueue_as_is():
    space = load_space("sassha", "sassha")
    study = optuna.create_study()
    for p in space.published_params():
        study.enqueue_trial(p)
    trial = study.ask()
    assert suggest(trial, space) == space.published_params()[0]


def test_budget_keys_match_hessian_metrics():
    from sassha_tune.metrics.sharpness import hessian_metrics

    kwargs = set(inspect.signature(hessian_metrics).parameters) - {"model", "loss_fn", "inputs", "targets", "seed",
                                                                   "subset_size"}
    assert kwargs == set(SHARPNESS_BUDGET_KEYS)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("sassha", "Sassha"), ("msassha", "MSassha"), ("adahessian", "AdaHessian"), ("sophiah", "SophiaH")],
)
def test_known_hparams_match_constructors(name, cls):
    # process_group is an object, never a config value
    sig = set(inspect.signature(getattr(optim, cls).__init__).parameters) - {"self", "params", "model", "process_group"}
    assert sig == set(OPTIMIZERS[name].hyperparameters)
