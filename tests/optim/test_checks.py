"""Each optimizer checks its own hyperparameters (its GROUP_CHECKS), in its constructor and in add_param_group."""

from __future__ import annotations

import pytest
import torch

from sassha_tune.optim import OPTIMIZERS
from sassha_tune.optim.preconditioned import HessianPreconditioned

PRECONDITIONED = [name for name, info in OPTIMIZERS.items() if issubclass(info.cls, HessianPreconditioned)]


@pytest.mark.parametrize("name", PRECONDITIONED)
def test_a_preconditioned_optimizer_checks_every_key_of_its_groups(name):
    info = OPTIMIZERS[name]
    group = info.build(torch.nn.Linear(2, 2), {"lr": 0.1}).param_groups[0]
    assert set(group) - {"params"} <= set(info.cls.GROUP_CHECKS)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_refused_value_in_the_constructor_or_a_new_group_names_its_key(name):
    info = OPTIMIZERS[name]
    for key in ("lr", "max_grad_norm", "rho", "lazy_hessian", "clip_threshold", "grad_reduce"):
        if key not in info.hyperparameters or key not in info.cls.GROUP_CHECKS:  # torch checks its own lr
            continue
        bad = "nope" if key == "grad_reduce" else -1
        with pytest.raises(ValueError, match=f"^Invalid {key}: "):
            info.build(torch.nn.Linear(2, 2), {"lr": 0.1, key: bad})
        opt = info.build(torch.nn.Linear(2, 2), {"lr": 0.1})
        groups = len(opt.param_groups)
        with pytest.raises(ValueError, match=f"^Invalid {key}: "):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], key: bad})
        assert len(opt.param_groups) == groups  # the refused group was not added
