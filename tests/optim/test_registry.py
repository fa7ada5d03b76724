"""The registry entry of an optimizer: its config conventions and defaults (sassha_tune.optim.registry)."""

from __future__ import annotations

import pytest

from sassha_tune.errors import ConfigError
from sassha_tune.optim import OPTIMIZERS
from sassha_tune.optim.registry import hparams_from_config


def test_config_defaults_are_the_constructors_with_the_registrys_over_them():
    sgd = OPTIMIZERS["sgd"].config_defaults()
    assert sgd["momentum"] == 0.9  # the registry's, over torch.optim.SGD's 0
    assert sgd["max_grad_norm"] is None  # OnePassStep's, passed on through **kwargs
    sassha = OPTIMIZERS["sassha"].config_defaults()
    assert (sassha["lr"], sassha["rho"], sassha["betas"]) == (0.15, 0.0, (0.9, 0.999))
    assert (sassha["beta1"], sassha["beta2"]) == (0.9, 0.999)
    sophia = OPTIMIZERS["sophiah"].config_defaults()
    assert (sophia["beta1"], sophia["beta2"]) == (0.965, 0.99)
    assert "params" not in sassha and "model" not in sassha


def test_hparams_follow_the_scripts_conventions():
    sassha = OPTIMIZERS["sassha"]
    assert sassha.hparams({"lr": 0.5, "weight_decay": 1e-3}, seed=4) == {"lr": 0.5, "weight_decay": 2e-3, "seed": 4}
    assert sassha.hparams({"lr": 0.5, "weight_decay": 1e-3, "seed": 1}, seed=4)["seed"] == 1
    assert sassha.hparams({"lr": 0.5, "weight_decay": 1e-3}, language=True)["weight_decay"] == 1e-3
    assert OPTIMIZERS["sgd"].hparams({"lr": 0.5, "weight_decay": 1e-3}, seed=4) == {"lr": 0.5, "weight_decay": 1e-3}
    assert OPTIMIZERS["adamw"].hparams({"beta2": 0.95}) == {"betas": (0.9, 0.95)}
    assert OPTIMIZERS["adamw"].hparams({"betas": [0.8, 0.9]}) == {"betas": (0.8, 0.9)}
    with pytest.raises(ConfigError, match=r"^weight_decay for msassha is given in the scripts' convention"):
        OPTIMIZERS["msassha"].hparams({"weight_decay": 1e-3})


def test_a_name_the_registry_does_not_know_gets_only_its_betas():
    assert hparams_from_config("mine", {"beta1": 0.5, "weight_decay": 1.0}, seed=3) == {
        "weight_decay": 1.0, "betas": (0.5, 0.999)}
