"""Gradient accumulation through the step protocol: a sequence of micro-batch closures is the
whole batch (float64: equal up to the rounding of splitting a mean in two)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sassha_tune.optim import build_optimizer

DT = torch.float64

HPARAMS = {
    "sgd": dict(lr=0.1, weight_decay=1e-3),
    "adamw": dict(lr=1e-2, weight_decay=1e-2),
    "sam_sgd": dict(lr=0.1, rho=0.1),
    "sam_adamw": dict(lr=1e-2, rho=0.05),
    "adahessian": dict(lr=0.05, lazy_hessian=2, eps=1e-3),
    "sophiah": dict(lr=0.02, lazy_hessian=2, clip_threshold=0.05),
    "sassha": dict(lr=0.05, rho=0.05, lazy_hessian=2, eps=1e-3, n_samples=2),
    "msassha": dict(lr=0.05, rho=0.1, lazy_hessian=2, eps=1e-3),
}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).to(DT)


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("name", sorted(HPARAMS))
def test_two_micro_batches_are_the_whole_batch(name):
    whole, split = _mlp(), _mlp()
    opt_w, opt_s = build_optimizer(name, whole, HPARAMS[name]), build_optimizer(name, split, HPARAMS[name])
    for step in range(5):  # refresh steps 1, 3, 5 and plain ones
        x, y = _batch(step)
        loss_w = opt_w.step(lambda x=x, y=y: _loss(whole, x, y))
        loss_s = opt_s.step([lambda x=x, y=y: _loss(split, x[:8], y[:8]), lambda x=x, y=y: _loss(split, x[8:], y[8:])])
        assert float(loss_s) == pytest.approx(float(loss_w), rel=1e-12)
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("name", ["sgd", "sassha"])
def test_one_closure_in_a_list_is_the_closure(name):
    a, b = _mlp(), _mlp()
    opt_a, opt_b = build_optimizer(name, a, HPARAMS[name]), build_optimizer(name, b, HPARAMS[name])
    for step in range(3):
        x, y = _batch(step)
        opt_a.step(lambda x=x, y=y: _loss(a, x, y))
        opt_b.step([lambda x=x, y=y: _loss(b, x, y)])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_empty_micro_batches_are_refused():
    opt = build_optimizer("sassha", _mlp(), HPARAMS["sassha"])
    with pytest.raises(ValueError, match="non-empty sequence of closures"):
        opt.step([])
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
