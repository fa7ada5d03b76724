"""The peers (SGD, AdamW, SAM, AdaHessian, Sophia-H) and the registry, all behind one step protocol."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sassha_tune.optim import OPTIMIZERS, SAMSGD, AdaHessian, SAMAdamW, SophiaH, build_optimizer

DT = torch.float64

HPARAMS = {
    "sgd": {"lr": 0.05},
    "adamw": {"lr": 1e-2},
    "sam_sgd": {"lr": 0.05, "rho": 0.05},
    "sam_adamw": {"lr": 1e-2, "rho": 0.05},
    "adahessian": {"lr": 0.05, "lazy_hessian": 2},
    "sophiah": {"lr": 1e-2, "lazy_hessian": 2},
    "sassha": {"lr": 0.05, "rho": 0.05, "lazy_hessian": 2},
    "msassha": {"lr": 0.05, "rho": 0.05, "lazy_hessian": 2, "weight_decay": 0.0},
    "sassha_lm": {"lr": 0.05, "rho": 0.05, "lazy_hessian": 2, "rho_warmup_iters": 3, "hessian_warmup_iters": 3},
}


def _convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).to(DT)


def _data(seed=0, n=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _train(model, opt, steps, data):
    x, y = data
    return [opt.step(lambda: nn.functional.cross_entropy(model(x), y)).item() for _ in range(steps)]


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_registry_has_every_optimizer():
    assert set(OPTIMIZERS) == set(HPARAMS)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        build_optimizer("lamb", _convnet(), {})


@pytest.mark.parametrize("name", sorted(HPARAMS))
def test_every_optimizer_reduces_the_loss(name):
    model = _convnet()
    opt = build_optimizer(name, model, {**HPARAMS[name], "max_grad_norm": 10.0})
    data = _data()
    losses = _train(model, opt, 25, data)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", sorted(HPARAMS))
def test_every_optimizer_resumes_from_state_dict(name):
    data = _data(1)
    model = _convnet()
    opt = build_optimizer(name, model, HPARAMS[name])
    _train(model, opt, 3, data)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    tail_a = _train(model, opt, 4, data)
    fresh = _convnet(seed=7)
    fresh.load_state_dict(saved_model)
    opt2 = build_optimizer(name, fresh, HPARAMS[name])
    opt2.load_state_dict(saved_opt)
    tail_b = _train(fresh, opt2, 4, data)
    assert tail_a == tail_b
    assert torch.equal(_flat(model), _flat(fresh))


@pytest.mark.parametrize("name", ["sam_sgd", "sam_adamw", "sassha"])
def test_second_pass_leaves_bn_running_stats_alone(name):
    model = _convnet()
    reference = copy.deepcopy(model)
    x, y = _data()
    opt = build_optimizer(name, model, HPARAMS[name])
    opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    reference(x)
    assert int(model[1].num_batches_tracked) == 1
    assert torch.allclose(model[1].running_mean, reference[1].running_mean, rtol=0, atol=1e-14)
    assert torch.allclose(model[1].running_var, reference[1].running_var, rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls", [AdaHessian, SophiaH])
def test_graph_only_on_refresh_equals_always_graph(cls):
    data = _data()
    a, b = _convnet(), _convnet()
    oa = cls(a.parameters(), lr=0.01, lazy_hessian=3)
    ob = cls(b.parameters(), lr=0.01, lazy_hessian=3, always_create_graph=True)
    assert _train(a, oa, 5, data) == _train(b, ob, 5, data)
    assert torch.equal(_flat(a), _flat(b))


# --- hand-computed updates on a separable quadratic (Hutchinson exact: diag H = D) ---------------


def _quadratic():
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(5, generator=g, dtype=DT)
    diag = torch.rand(5, generator=g, dtype=DT) * 2 + 0.1
    diag[2] = -0.5
    lin = torch.randn(5, generator=g, dtype=DT)
    return theta, diag, lin


def _run(opt_factory, theta, diag, lin, steps):
    p = nn.Parameter(theta.clone())
    opt = opt_factory([p])
    out = []
    for _ in range(steps):
        opt.step(lambda: (0.5 * diag * p * p + lin * p).sum())
        out.append(p.detach().clone())
    return out


@pytest.mark.parametrize("cls", [AdaHessian, SophiaH])
def test_dense_refresh_steps_equal_refresh_every_step_at_first(cls):
    a, b = _convnet(), _convnet()
    oa = cls(a.parameters(), lr=1e-2, lazy_hessian=4, dense_refresh_steps=3)
    ob = cls(b.parameters(), lr=1e-2, lazy_hessian=1)
    data = _data()
    assert _train(a, oa, 3, data) == _train(b, ob, 3, data)
    assert torch.equal(_flat(a), _flat(b))
    _train(a, oa, 1, data)  # h = 3: not dense any more and 3 % 4 != 0, so no refresh
    _train(b, ob, 1, data)
    assert not torch.equal(_flat(a), _flat(b))


def test_sam_sgd_matches_hand_computed():
    theta, diag, lin = _quadratic()
    lr, rho, wd, mom = 0.1, 0.2, 0.01, 0.9
    got = _run(lambda ps: SAMSGD(ps, lr=lr, rho=rho, weight_decay=wd, momentum=mom), theta, diag, lin, 5)
    th, buf = theta.clone(), None
    for step in range(5):
        g = diag * th + lin
        e = rho * g / (g.norm() + 1e-12)
        gt = diag * (th + e) + lin + wd * th  # coupled L2 at the restored point
        buf = gt if buf is None else mom * buf + gt
        th = th - lr * buf
        assert torch.allclose(got[step], th, rtol=0, atol=1e-13)


def test_asam_adamw_perturbation_is_elementwise():
    theta, diag, lin = _quadratic()
    lr, rho = 0.01, 0.1
    got = _run(lambda ps: SAMAdamW(ps, lr=lr, rho=rho, adaptive=True, weight_decay=0.0), theta, diag, lin, 1)
    g = diag * theta + lin
    e = rho * theta**2 * g / ((theta.abs() * g).norm() + 1e-12)
    gt = diag * (theta + e) + lin
    ref = nn.Parameter(theta.clone())
    adam = torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)
    ref.grad = gt
    adam.step()
    assert torch.allclose(got[0], ref.detach(), rtol=0, atol=1e-13)


def test_adahessian_matches_hand_computed():
    theta, diag, lin = _quadratic()
    lr, b1, b2, eps, wd, k = 0.05, 0.9, 0.99, 1e-4, 0.01, 2
    got = _run(
        lambda ps: AdaHessian(ps, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, lazy_hessian=k),
        theta,
        diag,
        lin,
        6,
    )
    th, m, v = theta.clone(), torch.zeros(5, dtype=DT), torch.zeros(5, dtype=DT)
    for t in range(1, 7):
        g = diag * th + lin
        th = th * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * diag**2  # the stored estimate is reused between refreshes
        th = th - lr / (1 - b1**t) * m / ((v / (1 - b2**t)) ** 0.5 + eps)
        assert torch.allclose(got[t - 1], th, rtol=0, atol=1e-12)


def test_sophiah_matches_hand_computed():
    theta, diag, lin = _quadratic()
    lr, b1, b2, eps, wd, k, gamma = 0.05, 0.9, 0.99, 1e-4, 0.01, 2, 0.05
    got = _run(
        lambda ps: SophiaH(
            ps, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, lazy_hessian=k, clip_threshold=gamma
        ),
        theta,
        diag,
        lin,
        6,
    )
    th, m, v = theta.clone(), torch.zeros(5, dtype=DT), torch.zeros(5, dtype=DT)
    for t in range(1, 7):
        g = diag * th + lin
        if (t - 1) % k == 0:
            v = b2 * v + (1 - b2) * diag  # signed estimate
        th = th * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        th = th - lr * torch.sign(m) * torch.clamp(m.abs() / (gamma * v.clamp(min=0) + eps), max=1.0)
        assert torch.allclose(got[t - 1], th, rtol=0, atol=1e-12)


def test_adahessian_averages_conv_kernels():
    model = _convnet()
    opt = AdaHessian(model.parameters(), lazy_hessian=1)
    _train(model, opt, 1, _data())
    h = opt.state[model[0].weight]["hessian"]
    assert torch.allclose(h, h[:, :, :1, :1].expand_as(h))
    assert (h >= 0).all()


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (SAMSGD, {"lr": 0.1, "rho": -1.0}, "rho"),
        (SAMAdamW, {"rho": 0.1, "max_grad_norm": -1.0}, "max_grad_norm"),
        (AdaHessian, {"lazy_hessian": 0}, "lazy_hessian"),
        (AdaHessian, {"betas": (0.9, 1.0)}, "betas"),
        (SophiaH, {"clip_threshold": 0.0}, "clip_threshold"),
        (SophiaH, {"eps": -1.0}, "eps"),
        (SophiaH, {"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_peers_reject_bad_hyperparameters(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(_convnet().parameters(), **kwargs)
