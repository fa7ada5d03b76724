"""Every hyperparameter is a param-group key: complete state_dict, per-group schedules, checked groups,
and the public step phases that trial packs drive (they must be the optimizer's own step)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sassha_tune.optim import SAMSGD, SGD, AdaHessian, AdamW, MSassha, Sassha, SophiaH
from sassha_tune.optim.base import second_pass_context
from sassha_tune.optim.hessian import ProbeRequest, graph_hvp, hutchinson_diagonal, hutchinson_diagonals

DT = torch.float64


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)


def _closure(model):
    x, y = _data()
    return lambda: nn.functional.cross_entropy(model(x), y)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


SECOND_ORDER = [
    (Sassha, dict(lr=0.05, rho=0.05, lazy_hessian=10, n_samples=2, hessian_power=0.5, bias_correction="refreshes")),
    (MSassha, dict(lr=0.05, rho=0.1, lazy_hessian=10, n_samples=2)),
    (AdaHessian, dict(lr=0.05, lazy_hessian=10, dense_refresh_steps=2)),
    (SophiaH, dict(lr=0.01, lazy_hessian=10, clip_threshold=0.05)),
]


@pytest.mark.parametrize(("cls", "kw"), SECOND_ORDER, ids=lambda v: getattr(v, "__name__", ""))
def test_every_hyperparameter_is_in_the_state_dict_and_restored(cls, kw):
    model = _mlp()
    opt = cls(model.parameters(), **kw)
    for _ in range(3):
        opt.step(_closure(model))
    saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the state tensors (as torch's does)
    for key, value in kw.items():
        assert saved["param_groups"][0][key] == value, key
    # a checkpoint of a k=10 run loaded into an optimizer built with k=5 continues with k=10 (as torch does)
    other = copy.deepcopy(model)
    resumed = cls(other.parameters(), **{**kw, "lazy_hessian": 5})
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lazy_hessian"] == 10
    for _ in range(8):  # steps 4..11: k=10 refreshes at step 11 only, k=5 would refresh at 6 and 11
        opt.step(_closure(model))
        resumed.step(_closure(other))
    assert torch.equal(_flat(model), _flat(other))
    p = next(model.parameters())
    assert opt.state[p]["hessian_refreshes"] == resumed.state[next(other.parameters())]["hessian_refreshes"]


def test_old_checkpoint_without_a_group_key_keeps_the_current_value():
    model = _mlp()
    opt = Sassha(model.parameters(), lr=0.05, rho=0.05, lazy_hessian=3)
    opt.step(_closure(model))
    saved = copy.deepcopy(opt.state_dict())
    del saved["param_groups"][0]["lazy_hessian"]  # what a checkpoint from before the key existed lacks
    resumed = Sassha(copy.deepcopy(model).parameters(), lr=0.05, rho=0.05, lazy_hessian=3)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lazy_hessian"] == 3


def test_groups_follow_their_own_refresh_schedule():
    model = _mlp()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = Sassha([{"params": first, "lazy_hessian": 2}, {"params": second, "lazy_hessian": 3}], lr=0.05, rho=0.05)
    for _ in range(6):
        opt.step(_closure(model))
    # refreshed at h = 0, 2, 4 (k=2) and h = 0, 3 (k=3)
    assert {opt.state[p]["hessian_refreshes"] for p in first} == {3}
    assert {opt.state[p]["hessian_refreshes"] for p in second} == {2}


def test_equal_groups_draw_the_probe_stream_of_one_group():
    # two groups with the same settings are one request per group; the probes are drawn in
    # parameter order either way, so the trajectory is that of a single group
    a, b = _mlp(), _mlp()
    opt_a = Sassha(a.parameters(), lr=0.05, rho=0.05, lazy_hessian=2, n_samples=2)
    opt_b = Sassha([{"params": list(b[0].parameters())}, {"params": list(b[2].parameters())}],
                   lr=0.05, rho=0.05, lazy_hessian=2, n_samples=2)
    for _ in range(4):
        opt_a.step(_closure(a))
        opt_b.step(_closure(b))
    assert torch.equal(_flat(a), _flat(b))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda ps: Sassha([{"params": ps[:2], "lazy_hessian": 0}, {"params": ps[2:]}]), "Invalid lazy_hessian: 0"),
        (lambda ps: Sassha([{"params": ps[:2], "hessian_point": "middle"}, {"params": ps[2:]}]), "Invalid hessian_point"),
        (lambda ps: Sassha([{"params": ps[:2], "max_grad_norm": 1.0}, {"params": ps[2:]}]),
         "max_grad_norm: None in one parameter group and 1.0 in another"),
        (lambda ps: SAMSGD([{"params": ps[:2], "adaptive": True}, {"params": ps[2:]}], lr=0.1),
         "Invalid adaptive: True in one parameter group and False in another"),
        (lambda ps: SAMSGD([{"params": ps[:2], "rho": -1.0}, {"params": ps[2:]}], lr=0.1), "Invalid rho: -1.0"),
        (lambda ps: SGD(ps, lr=0.1, max_grad_norm=0.0), "Invalid max_grad_norm: 0.0"),
    ],
)
def test_bad_groups_are_refused_naming_the_key(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build(list(_mlp().parameters()))


def test_a_refused_group_is_not_added():
    model = _mlp()
    opt = Sassha(list(model[0].parameters()), lr=0.05)
    with pytest.raises(ValueError, match="Invalid n_samples"):
        opt.add_param_group({"params": list(model[2].parameters()), "n_samples": 0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [SGD, AdamW])
def test_step_without_closure_clips_to_max_grad_norm(cls):
    a, b = _mlp(), _mlp()
    opt_a, opt_b = cls(a.parameters(), lr=0.1, max_grad_norm=0.01), cls(b.parameters(), lr=0.1, max_grad_norm=0.01)
    loss = _closure(a)()
    loss.backward()
    opt_a.step()  # the gradients of a loop of your own
    opt_b.step(_closure(b))
    assert torch.equal(_flat(a), _flat(b))
    assert float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a.parameters()]))) <= 0.01 + 1e-12


def test_sam_phases_are_its_step():
    a, b = _mlp(), _mlp()
    opt_a = SAMSGD(a.parameters(), lr=0.1, rho=0.1, momentum=0.9, model=a)
    opt_b = SAMSGD(b.parameters(), lr=0.1, rho=0.1, momentum=0.9, model=b)
    for _ in range(3):
        opt_a.step(_closure(a))
        opt_b.zero_grad(set_to_none=True)  # step(closure) clears them itself
        _closure(b)().backward()
        perturbation = opt_b.perturb()
        assert all(p.grad is None for p in b.parameters())
        with second_pass_context(b):
            _closure(b)().backward()
        opt_b.restore_and_update(perturbation)
    assert torch.equal(_flat(a), _flat(b))


def test_sassha_phases_are_its_step():
    """The phases a trial pack drives (plan_step, perturbation, hessian estimate, update) are
    Sassha.step, bitwise, over refresh and non-refresh steps and both Hessian points."""
    for point in ("reference", "perturbed"):
        a, b = _mlp(), _mlp()
        kw = dict(lr=0.05, rho=0.05, lazy_hessian=2, n_samples=2, hessian_point=point, weight_decay=1e-3)
        opt_a, opt_b = Sassha(a.parameters(), **kw), Sassha(b.parameters(), **kw)
        params = [list(b.parameters())]
        for _ in range(4):
            opt_a.step(_closure(a))
            with torch.enable_grad():
                g1 = list(torch.autograd.grad(_closure(b)(), params[0]))
            plan = opt_b.plan_step(params)
            with torch.no_grad():
                es = opt_b.perturbation(params, [g1])
                torch._foreach_add_([p.data for p in params[0]], es[0])
            with torch.enable_grad():
                g2 = list(torch.autograd.grad(_closure(b)(), params[0], create_graph=plan.need_graph))
            due = plan.due[0]
            est = None
            if due and point == "perturbed":
                est = opt_b.hessian_estimates([[g2[i] for i in due]], [[params[0][i] for i in due]])
            with torch.no_grad():
                torch._foreach_sub_([p.data for p in params[0]], es[0])
            if due and point == "reference":
                est = opt_b.hessian_estimates([[g2[i] for i in due]], [[params[0][i] for i in due]])
            with torch.no_grad():
                opt_b.update(params, [g2], est, plan)
        assert torch.equal(_flat(a), _flat(b)), point


def test_one_hessian_product_serves_several_requests():
    """hutchinson_diagonals with two requests (own generators, own sample counts) and one product per
    sample of the summed graph gives each request its lone estimate."""
    models = [_mlp(0), _mlp(1)]
    x, y = _data()
    losses = [nn.functional.cross_entropy(m(x), y) for m in models]
    params = [list(m.parameters()) for m in models]
    grads = [list(torch.autograd.grad(loss, ps, create_graph=True)) for loss, ps in zip(losses, params, strict=True)]
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    together = hutchinson_diagonals(
        [ProbeRequest(params[0], gens[0], 3), ProbeRequest(params[1], gens[1], 1)], graph_hvp(grads, params, retain_graph=True)
    )
    alone = [
        hutchinson_diagonal(grads[0], params[0], torch.Generator().manual_seed(5), n_samples=3, retain_graph=True),
        hutchinson_diagonal(grads[1], params[1], torch.Generator().manual_seed(6), n_samples=1, retain_graph=True),
    ]
    for t, a in zip(together, alone, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(t, a, strict=True))
