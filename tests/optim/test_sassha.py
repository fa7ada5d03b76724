"""SASSHA / M-SASSHA against hand-computed trajectories, and their protocol guarantees."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sassha_tune.optim import MSassha, Sassha
from sassha_tune.optim.base import clip_grads_, frozen_running_stats
from sassha_tune.optim.functional import due_for_refresh, sam_perturbation

DT = torch.float64


# --- a separable quadratic: diag(H) = D exactly, so Hutchinson is exact for any probe ------------


def _quadratic(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3,), (2, 2)]
    theta = [torch.randn(s, generator=g, dtype=DT) for s in shapes]
    diag = [torch.rand(s, generator=g, dtype=DT) * 3 + 0.2 for s in shapes]
    diag[0][1] = -0.7  # a negative curvature entry: exercises |h|
    lin = [torch.randn(s, generator=g, dtype=DT) for s in shapes]
    return theta, diag, lin


def _qgrad(theta, diag, lin):
    return [d * t + c for t, d, c in zip(theta, diag, lin, strict=True)]


def _qloss(params, diag, lin):
    return sum((0.5 * d * p * p + c * p).sum() for p, d, c in zip(params, diag, lin, strict=True))


def _hand_trajectory(
    theta, diag, lin, *, lrs, rhos, wds, steps, k, beta1, beta2, alpha, eps, bias, momentum_sam=False
):
    """SASSHA (or M-SASSHA with ``momentum_sam``) written out element-wise from the reference equations."""
    theta = [t.clone() for t in theta]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    c = [1.0 for _ in theta]
    refreshes = 0
    out = []
    for t in range(1, steps + 1):
        if momentum_sam:
            mnorm = math.sqrt(sum(float((x * x).sum()) for x in m))
            point = [th - r * x / (mnorm + 1e-12) for th, r, x in zip(theta, rhos, m, strict=True)]
        else:
            g = _qgrad(theta, diag, lin)
            gnorm = math.sqrt(sum(float((x * x).sum()) for x in g))
            point = [th + r * x / (gnorm + 1e-12) for th, r, x in zip(theta, rhos, g, strict=True)]
        gt = _qgrad(point, diag, lin)
        refresh = (t - 1) % k == 0
        if refresh:
            refreshes += 1
        for i in range(len(theta)):
            if refresh:
                v[i] = beta2 * v[i] + (1 - beta2) * diag[i].abs()
                tb = t if bias == "steps" else refreshes
                c[i] = (1 - beta2**tb) ** alpha
            theta[i] = theta[i] * (1 - lrs[i] * wds[i])
            m[i] = beta1 * m[i] + (1 - beta1) * gt[i]
            theta[i] = theta[i] - lrs[i] / (1 - beta1**t) * m[i] / (v[i] ** alpha / c[i] + eps)
        out.append([x.clone() for x in theta])
    return out


def _run_quadratic(cls, theta, diag, lin, *, lrs, rhos, wds, steps, **kw):
    params = [nn.Parameter(t.clone()) for t in theta]
    groups = [
        {"params": [p], "lr": lr, "rho": r, "weight_decay": wd}
        for p, lr, r, wd in zip(params, lrs, rhos, wds, strict=True)
    ]
    opt = cls(groups, **kw)
    out = []
    for _ in range(steps):
        opt.step(lambda: _qloss(params, diag, lin))
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("bias", ["steps", "refreshes"])
@pytest.mark.parametrize("point", ["reference", "perturbed"])
def test_sassha_matches_hand_computed_trajectory(bias, point):
    theta, diag, lin = _quadratic()
    hp = dict(lrs=[0.05, 0.1], rhos=[0.05, 0.2], wds=[0.01, 0.0], steps=14)
    got = _run_quadratic(
        Sassha,
        theta,
        diag,
        lin,
        **hp,
        lazy_hessian=3,
        betas=(0.9, 0.99),
        eps=1e-4,
        hessian_power=0.5,
        bias_correction=bias,
        hessian_point=point,
    )
    want = _hand_trajectory(
        theta, diag, lin, **hp, k=3, beta1=0.9, beta2=0.99, alpha=0.5, eps=1e-4, bias=bias
    )
    for step, (g_step, w_step) in enumerate(zip(got, want, strict=True)):
        for g, w in zip(g_step, w_step, strict=True):
            assert torch.allclose(g, w, rtol=0, atol=1e-12), f"step {step + 1}"


def test_msassha_matches_hand_computed_trajectory():
    theta, diag, lin = _quadratic(1)
    hp = dict(lrs=[0.05, 0.08], rhos=[0.1, 0.3], wds=[0.01, 0.02], steps=12)
    got = _run_quadratic(
        MSassha, theta, diag, lin, **hp, lazy_hessian=4, betas=(0.9, 0.99), hessian_power=1.0
    )
    want = _hand_trajectory(
        theta,
        diag,
        lin,
        **hp,
        k=4,
        beta1=0.9,
        beta2=0.99,
        alpha=1.0,
        eps=1e-4,
        bias="steps",
        momentum_sam=True,
    )
    for g_step, w_step in zip(got, want, strict=True):
        for g, w in zip(g_step, w_step, strict=True):
            assert torch.allclose(g, w, rtol=0, atol=1e-12)


def test_msassha_with_rho_zero_equals_sassha_with_rho_zero():
    theta, diag, lin = _quadratic(2)
    hp = dict(lrs=[0.05, 0.05], rhos=[0.0, 0.0], wds=[0.0, 0.0], steps=7)
    a = _run_quadratic(MSassha, theta, diag, lin, **hp, lazy_hessian=2, hessian_power=0.5)
    b = _run_quadratic(Sassha, theta, diag, lin, **hp, lazy_hessian=2, hessian_power=0.5)
    for x, y in zip(a[-1], b[-1], strict=True):
        assert torch.allclose(x, y, rtol=0, atol=1e-14)


def test_hessian_power_schedule_is_called_per_step():
    theta, diag, lin = _quadratic()
    seen = []
    params = [nn.Parameter(t.clone()) for t in theta]
    opt = Sassha(params, hessian_power=lambda s: seen.append(s) or 0.5, lazy_hessian=2)
    for _ in range(3):
        opt.step(lambda: _qloss(params, diag, lin))
    assert seen == [1, 2, 3]


# --- probes: the optimizer's own generator, reference stream -------------------------------------


def test_probes_match_randint_stream_from_same_seed():
    gen = torch.Generator().manual_seed(5)
    n = 5
    a = torch.randn(n, n, generator=gen, dtype=DT)
    hess = a @ a.T - 2 * torch.eye(n, dtype=DT)  # full, indefinite: diag estimate depends on z
    p1 = nn.Parameter(torch.randn(2, dtype=DT, generator=gen))
    p2 = nn.Parameter(torch.randn(3, dtype=DT, generator=gen))

    def loss():
        x = torch.cat([p1, p2])
        return 0.5 * x @ hess @ x

    beta2, k, seed = 0.99, 2, 11
    opt = Sassha([p1, p2], rho=0.1, lazy_hessian=k, betas=(0.9, beta2), seed=seed)
    ref = torch.Generator().manual_seed(seed)
    v = torch.zeros(n, dtype=DT)
    for step in range(1, 2 * k + 2):
        opt.step(loss)
        if (step - 1) % k == 0:
            z = torch.cat([torch.randint(0, 2, s, generator=ref, dtype=DT) * 2 - 1 for s in [(2,), (3,)]])
            v = beta2 * v + (1 - beta2) * (z * (hess @ z)).abs()
        got = torch.cat([opt.state[p1]["exp_hessian_diag"], opt.state[p2]["exp_hessian_diag"]])
        assert torch.allclose(got, v, rtol=0, atol=1e-14), step


# --- two passes, graph, Hessian point, bias correction ----------------------------------------------


def _mlp(seed=0, dtype=DT, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 12), nn.Tanh()]
    if bn:
        layers.append(nn.BatchNorm1d(12))
    layers += [nn.Linear(12, 3)]
    return nn.Sequential(*layers).to(dtype)


def _data(seed=0, dtype=DT, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _train(model, opt, steps, data=None):
    x, y = data if data is not None else _data()
    losses = []
    for _ in range(steps):
        losses.append(opt.step(lambda: nn.functional.cross_entropy(model(x), y)).item())
    return losses


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_graph_only_on_refresh_equals_always_graph():
    a, b = _mlp(), _mlp()
    oa = Sassha(a.parameters(), lr=0.05, rho=0.1, lazy_hessian=3, model=a)
    ob = Sassha(b.parameters(), lr=0.05, rho=0.1, lazy_hessian=3, model=b, always_create_graph=True)
    la, lb = _train(a, oa, 8), _train(b, ob, 8)
    assert la == lb
    assert torch.equal(_flat(a), _flat(b))


def test_hybrid_and_perturbed_hessian_points_differ_on_nonlinear_net():
    a, b = _mlp(), _mlp()
    oa = Sassha(a.parameters(), rho=0.5, hessian_point="reference")
    ob = Sassha(b.parameters(), rho=0.5, hessian_point="perturbed")
    _train(a, oa, 1)
    _train(b, ob, 1)
    va = torch.cat([oa.state[p]["exp_hessian_diag"].flatten() for p in a.parameters()])
    vb = torch.cat([ob.state[p]["exp_hessian_diag"].flatten() for p in b.parameters()])
    assert (va - vb).norm() / vb.norm() > 1e-3


def test_bias_correction_options_differ_only_from_step_k_plus_1():
    k = 3
    a, b = _mlp(), _mlp()
    oa = Sassha(a.parameters(), lr=0.05, rho=0.1, lazy_hessian=k, bias_correction="steps")
    ob = Sassha(b.parameters(), lr=0.05, rho=0.1, lazy_hessian=k, bias_correction="refreshes")
    _train(a, oa, k)
    _train(b, ob, k)
    assert torch.equal(_flat(a), _flat(b))
    _train(a, oa, 1)
    _train(b, ob, 1)
    assert not torch.allclose(_flat(a), _flat(b), rtol=0, atol=1e-8)


@pytest.mark.parametrize("cls", [Sassha, MSassha])
def test_dense_refresh_steps_refresh_every_step_first_then_every_k(cls):
    n, k = 5, 4
    a, b = _mlp(), _mlp()
    oa = cls(a.parameters(), lr=0.05, rho=0.1, lazy_hessian=k, dense_refresh_steps=n)
    ob = cls(b.parameters(), lr=0.05, rho=0.1, lazy_hessian=1)
    la, lb = _train(a, oa, n), _train(b, ob, n)
    # the first n steps are exactly those of refresh-every-step (same probe stream)
    assert la == lb
    assert torch.equal(_flat(a), _flat(b))
    _train(a, oa, 8)  # gradient steps h = 5..12: refreshed where h % 4 == 0, i.e. h = 8 and 12
    assert {oa.state[p]["hessian_refreshes"] for p in a.parameters()} == {n + 2}


@pytest.mark.parametrize("n", [0, 1])
def test_dense_refresh_steps_zero_or_one_is_the_reference_schedule(n):
    # h = 0 is a refresh step of the reference schedule already, so N = 1 adds nothing either
    refreshed = [due_for_refresh(h, 3, n) for h in range(7)]
    assert refreshed == [True, False, False, True, False, False, True]
    # and the optimizer follows that schedule: refreshes at its steps 1, 4 and 7
    model = _mlp()
    opt = Sassha(model.parameters(), lr=0.05, rho=0.1, lazy_hessian=3, dense_refresh_steps=n)
    counts = []
    for _ in range(7):
        _train(model, opt, 1)
        counts.append(opt.state[next(model.parameters())]["hessian_refreshes"])
    assert counts == [1, 1, 1, 2, 2, 2, 3]


@pytest.mark.parametrize("cls", [Sassha, MSassha])
def test_bn_running_stats_move_once_per_step(cls):
    model = _mlp(bn=True)
    reference = copy.deepcopy(model)
    x, y = _data()
    opt = cls(model.parameters(), rho=0.3, **({"model": model} if cls is Sassha else {}))
    opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    reference(x)  # one clean train-mode forward at the same weights
    bn, bn_ref = model[2], reference[2]
    assert int(bn.num_batches_tracked) == 1
    assert torch.allclose(bn.running_mean, bn_ref.running_mean, rtol=0, atol=1e-14)
    assert torch.allclose(bn.running_var, bn_ref.running_var, rtol=0, atol=1e-14)


def test_frozen_running_stats_restores_tracking():
    model = _mlp(bn=True)
    before = model[2].running_mean.clone()
    with frozen_running_stats(model):
        model(_data()[0])
    assert torch.equal(model[2].running_mean, before)
    assert model[2].track_running_stats


def test_no_perturbation_left_in_state_and_weights_at_theta_after_msassha_step():
    model = _mlp()
    opt = MSassha(model.parameters(), lr=0.0, weight_decay=0.0, rho=0.5)
    before = _flat(model).clone()
    _train(model, opt, 3)
    # lr = 0: the weights must be exactly where they were (perturbation removed inside step)
    assert torch.allclose(_flat(model), before, rtol=0, atol=1e-15)
    for st in opt.state.values():
        assert set(st) == {
            "step",
            "hessian_step",
            "hessian_refreshes",
            "bias_correction2",
            "exp_avg",
            "exp_hessian_diag",
        }


# --- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Sassha, MSassha])
def test_state_dict_resume_continues_identical_trajectory(cls):
    x, y = _data()
    model = _mlp()
    opt = cls(model.parameters(), lr=0.05, rho=0.1, lazy_hessian=3, seed=3)
    _train(model, opt, 5, (x, y))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    tail_a = _train(model, opt, 6, (x, y))

    fresh = _mlp(seed=99)
    fresh.load_state_dict(saved_model)
    opt2 = cls(fresh.parameters(), lr=0.05, rho=0.1, lazy_hessian=3, seed=123)
    opt2.load_state_dict(saved_opt)
    tail_b = _train(fresh, opt2, 6, (x, y))
    assert tail_a == tail_b
    assert torch.equal(_flat(model), _flat(fresh))


# --- groups and validation ------------------------------------------------------------------------


def test_group_with_zero_lr_does_not_move_but_its_rho_perturbs_the_others():
    def run(rho_frozen):
        model = _mlp()
        frozen, free = model[0], model[2]
        opt = Sassha(
            [
                {"params": frozen.parameters(), "lr": 0.0, "rho": rho_frozen},
                {"params": free.parameters(), "lr": 0.05, "rho": 0.1},
            ]
        )
        w0 = frozen.weight.detach().clone()
        _train(model, opt, 2)
        # lr = 0: only the rounding of the in-place restore (theta + e) - e remains
        assert torch.allclose(frozen.weight, w0, rtol=0, atol=1e-15)
        return free.weight.detach().clone()

    assert not torch.equal(run(0.0), run(0.5))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -1.0}, "lr"),
        ({"rho": -0.1}, "rho"),
        ({"eps": -1e-4}, "eps"),
        ({"weight_decay": -1e-3}, "weight_decay"),
        ({"lazy_hessian": 0}, "lazy_hessian"),
        ({"n_samples": 0}, "n_samples"),
        ({"dense_refresh_steps": -1}, "dense_refresh_steps"),
        ({"dense_refresh_steps": 2.5}, "dense_refresh_steps"),
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"hessian_point": "clean"}, "hessian_point"),
        ({"bias_correction": "updates"}, "bias_correction"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"hessian_power": -0.5}, "hessian_power"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    for cls in (Sassha, MSassha):
        if cls is MSassha and name == "hessian_point":
            continue
        with pytest.raises(ValueError, match=name):
            cls(_mlp().parameters(), **kwargs)


# --- shared helpers ---------------------------------------------------------------------------------


def test_sam_perturbation_global_norm_and_adaptive():
    p = [[torch.tensor([1.0, -2.0], dtype=DT)], [torch.tensor([3.0], dtype=DT)]]
    g = [[torch.tensor([3.0, 0.0], dtype=DT)], [torch.tensor([4.0], dtype=DT)]]
    e = sam_perturbation(p, g, [1.0, 2.0], [0.0, 0.0])
    assert torch.allclose(e[0][0], torch.tensor([0.6, 0.0], dtype=DT))
    assert torch.allclose(e[1][0], torch.tensor([1.6], dtype=DT))
    ea = sam_perturbation(p, g, [1.0, 1.0], [0.0, 0.0], adaptive=True)
    norm = math.sqrt(3.0**2 + 12.0**2)
    assert torch.allclose(ea[0][0], torch.tensor([3.0 / norm, 0.0], dtype=DT))
    assert torch.allclose(ea[1][0], torch.tensor([36.0 / norm], dtype=DT))


def test_clip_grads():
    g = [torch.tensor([3.0]), torch.tensor([4.0])]
    total = clip_grads_(g, 1.0)
    assert float(total) == pytest.approx(5.0)
    assert float(torch.cat(g).norm()) == pytest.approx(1.0, rel=1e-5)
    g2 = [torch.tensor([0.3])]
    clip_grads_(g2, 1.0)
    assert float(g2[0]) == pytest.approx(0.3)
    assert clip_grads_(g2, None) is None


def test_max_grad_norm_clips_the_update_gradient():
    model = _mlp()
    opt = Sassha(model.parameters(), rho=0.1, max_grad_norm=1e-3)
    _train(model, opt, 1)
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert float(total) <= 1e-3 * (1 + 1e-6)
