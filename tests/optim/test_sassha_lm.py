"""SASSHA's language-model variant (sassha_tune.optim.SasshaLM) against a hand-computed trajectory,
and its warm-up, clipping, weight-decay groups, micro-batches and resume guarantees."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sassha_tune.optim.sassha_lm import SasshaLM, linear_weight_groups

DT = torch.float64


# --- a separable quadratic per micro-batch: diag(H_j) = D_j exactly, so Hutchinson is exact --------


def _problem(seed: int = 0, micro: int = 2):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3,), (2, 2)]
    theta = [torch.randn(s, generator=g, dtype=DT) for s in shapes]
    diag = [[torch.rand(s, generator=g, dtype=DT) * 3 + 0.2 for s in shapes] for _ in range(micro)]
    diag[0][0][1] = -2.5  # negative curvature in one micro-batch: exercises |h| after the sum
    lin = [[torch.randn(s, generator=g, dtype=DT) for s in shapes] for _ in range(micro)]
    return theta, diag, lin


def _micro_loss(params, d, c):
    return sum((0.5 * di * p * p + ci * p).sum() for p, di, ci in zip(params, d, c, strict=True))


def _clip(g, max_norm):
    norm = math.sqrt(sum(float((x * x).sum()) for x in g))
    coef = min(max_norm / (norm + 1e-6), 1.0)
    return [x * coef for x in g], norm


def _hand(theta, diag, lin, *, steps, lr, wds, betas, rho, k, eps, alpha, alpha_warm, warm, warm_h, clip):
    """The LM variant written out element-wise from its equations (docs/optimizer.md)."""
    n = len(diag)
    theta = [t.clone() for t in theta]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    b1, b2 = betas
    trajectory = []
    for i in range(steps):
        refresh = i % k == 0
        g = [sum((diag[j][q] * theta[q] + lin[j][q]) / n for j in range(n)) for q in range(len(theta))]
        h = [sum(diag[j][q] / n for j in range(n)) for q in range(len(theta))]
        if i > warm:
            g, _ = _clip(g, clip)
            norm = math.sqrt(sum(float((x * x).sum()) for x in g))
            point = [t + rho * x / (norm + 1e-12) for t, x in zip(theta, g, strict=True)]
            g = [sum((diag[j][q] * point[q] + lin[j][q]) / n for j in range(n)) for q in range(len(theta))]
        g, _ = _clip(g, clip)
        a = alpha_warm if i <= warm_h else alpha
        for q in range(len(theta)):
            theta[q] = theta[q] * (1 - lr * wds[q])
            m[q] = b1 * m[q] + (1 - b1) * g[q]
            if refresh:
                v[q] = b2 * v[q] + (1 - b2) * h[q].abs()
            theta[q] = theta[q] - lr * m[q] / (v[q] ** a + eps)
        trajectory.append([t.clone() for t in theta])
    return trajectory


@pytest.mark.parametrize("clip", [None, 0.3])
def test_matches_the_hand_computed_trajectory(clip):
    theta0, diag, lin = _problem()
    kw = dict(lr=0.05, betas=(0.9, 0.95), rho=0.1, k=3, eps=1e-4, alpha=0.8, alpha_warm=1.0, warm=2, warm_h=3)
    # iterations 0-2 warm-up (no perturbation), 3-7 perturbed; refreshes at 0, 3, 6; alpha 1 up to 3
    expected = _hand(theta0, diag, lin, steps=8, wds=[0.1, 0.0], clip=math.inf if clip is None else clip, **kw)
    params = [t.clone().requires_grad_() for t in theta0]
    opt = SasshaLM(
        [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}],
        lr=kw["lr"], betas=kw["betas"], rho=kw["rho"], lazy_hessian=kw["k"], eps=kw["eps"], hessian_power=0.8,
        warmup_hessian_power=1.0, rho_warmup_iters=2, hessian_warmup_iters=3, max_grad_norm=clip,
    )
    closures = [lambda j=j: _micro_loss(params, diag[j], lin[j]) for j in range(2)]
    for i, want in enumerate(expected):
        assert opt.in_rho_warmup() == (i <= 2)
        opt.step(closures)
        for got, w in zip(params, want, strict=True):
            assert torch.allclose(got.detach(), w, rtol=1e-12, atol=1e-14), (i, clip)
    # v was refreshed 3 times (iterations 0, 3, 6), m and the step count every iteration
    st = opt.state[params[0]]
    assert (st["step"], st["hessian_refreshes"]) == (8, 3)


def test_no_second_pass_during_the_warm_up():
    calls = []
    p = torch.zeros(3, dtype=DT, requires_grad=True)

    def closure():
        calls.append(float(p.detach().sum()))
        return ((p - 1.0) ** 2).sum()

    opt = SasshaLM([p], lr=0.1, rho=0.5, rho_warmup_iters=1, lazy_hessian=1, max_grad_norm=None)
    opt.step(closure)  # iteration 0: warm-up
    opt.step(closure)  # iteration 1: still (i <= 1)
    assert len(calls) == 2
    opt.step(closure)  # iteration 2: two passes, the second at the perturbed point
    assert len(calls) == 4 and calls[3] != calls[2]
    opt_none = SasshaLM([torch.zeros(2, requires_grad=True)], rho_warmup_iters=None)
    assert not opt_none.in_rho_warmup()


def _gpt_like():
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 6)
            self.ln = nn.LayerNorm(6)
            self.fc = nn.Linear(6, 6)
            self.head = nn.Linear(6, 7, bias=False)
            self.head.weight = self.emb.weight  # tied

        def forward(self, x):
            return self.head(torch.tanh(self.fc(self.ln(self.emb(x)))))

    return Tiny().to(DT)


def test_weight_decay_groups_decay_linear_weights_only():
    model = _gpt_like()
    decayed, plain = linear_weight_groups(model, 0.1)
    assert [id(p) for p in decayed["params"]] == [id(model.fc.weight)]
    # sorted by name (emb.weight, fc.bias, ln.bias, ln.weight), not in model order (emb, ln, fc)
    assert [id(p) for p in plain["params"]] == [id(model.emb.weight), id(model.fc.bias), id(model.ln.bias),
                                                id(model.ln.weight)]
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)


def test_the_registry_orders_the_groups_by_name_as_the_official_code():
    """``optimizer.name: sassha_lm`` builds the decayed and not-decayed groups sorted by parameter
    name, as the official ``configure_optimizers`` (``sorted`` on the names): the probes are drawn in
    that order. With 11 layers string order puts block 10 before block 2, unlike the model's order."""
    from sassha_tune.optim import build_optimizer
    from sassha_tune.training.models import build_model

    model = build_model("gpt", (4,), 5, n_layer=11, n_head=1, n_embd=4)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer("sassha_lm", model, {"weight_decay": 0.1})
    decayed, plain = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert decayed == sorted(decayed) and plain == sorted(plain)
    assert decayed.index("blocks.10.attn.proj.weight") < decayed.index("blocks.2.attn.proj.weight")
    in_model_order = [n for n in names.values() if n in set(decayed)]
    assert in_model_order != decayed and sorted(in_model_order) == decayed
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"head.weight"}
    assert set(decayed) == linear  # every linear weight but the head tied to the token embedding
    assert set(plain) == set(names.values()) - linear and "tok.weight" in plain
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def _lm_closures(model, step):
    g = torch.Generator().manual_seed(50 + step)
    x = torch.randint(0, 7, (8, 5), generator=g)
    y = torch.randint(0, 7, (8, 5), generator=g)

    def micro(sl):
        return lambda: nn.functional.cross_entropy(model(x[sl]).reshape(-1, 7), y[sl].reshape(-1))

    return [micro(slice(0, 4)), micro(slice(4, 8))]


def test_resume_with_gradient_accumulation_is_exact():
    model = _gpt_like()
    kw = dict(lr=0.05, rho=0.05, lazy_hessian=2, rho_warmup_iters=1, hessian_warmup_iters=2, n_samples=2)
    opt = SasshaLM(linear_weight_groups(model, 0.01), **kw)
    for step in range(3):
        opt.step(_lm_closures(model, step))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    tail = [float(opt.step(_lm_closures(model, step))) for step in range(3, 7)]
    fresh = _gpt_like()
    fresh.load_state_dict(saved_model)
    resumed = SasshaLM(linear_weight_groups(fresh, 0.01), **{**kw, "lazy_hessian": 5})
    resumed.load_state_dict(saved_opt)  # restores lazy_hessian=2, the iteration count and the probe stream
    assert resumed.iteration == 3 and resumed.param_groups[0]["lazy_hessian"] == 2
    tail_resumed = [float(resumed.step(_lm_closures(fresh, step))) for step in range(3, 7)]
    assert tail == tail_resumed
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_fresh_probes_per_micro_batch():
    # with two micro-batches a refresh draws two sets of probes (the whole-batch IC variant draws one)
    model = _gpt_like()
    opt = SasshaLM(model.parameters(), lazy_hessian=1, rho_warmup_iters=None, n_samples=1)
    opt.step(_lm_closures(model, 0))
    n_elements = sum(p.numel() for p in model.parameters())
    after_one = opt.generator.get_state()
    reference = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in model.parameters():
            torch.randint(0, 2, p.shape, generator=reference, dtype=p.dtype)
    assert torch.equal(after_one, reference.get_state()) and n_elements > 0


def test_bad_hyperparameters_name_the_argument():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="Invalid grad_reduce"):
        SasshaLM(p, grad_reduce="max")
    with pytest.raises(ValueError, match="Invalid rho_warmup_iters"):
        SasshaLM(p, rho_warmup_iters=-1)
