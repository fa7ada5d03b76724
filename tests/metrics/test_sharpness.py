"""Tests for sassha_tune.metrics.sharpness: exactness on small problems, invariances, and the protocol."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sassha_tune.metrics import sharpness
from sassha_tune.metrics.sharpness import (
    SharpnessTracker,
    generalization_gap,
    hessian_metrics,
    measurement_protocol,
    select_subset,
)
from sassha_tune.optim import hessian as hessian_module

torch.set_num_threads(1)

FAST = {"trace_probes": 0, "sam_rho": None, "adaptive_rho": None}


def tiny_mlp(act: type[nn.Module] = nn.Tanh, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 3)).double()


def data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            n = math.prod(shape)
            params[name] = flat[start : start + n].view(shape)
            start += n
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat0)


class DiagonalQuadratic(nn.Module):
    """Loss 0.5 * sum(d_i w_i^2), whatever the input: Hessian diag(d), gradient d * w."""

    def __init__(self, d: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("d", d.clone())
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.d * self.w**2).sum()


def output_loss(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return out


# ----------------------------------------------------------------------------------------------
# lambda_max and trace against the exact Hessian
# ----------------------------------------------------------------------------------------------


def test_lanczos_and_power_match_exact_top_eigenvalue_and_trace_within_3_se() -> None:
    model = tiny_mlp()
    x, y = data()
    h = exact_hessian(model, x, y)
    evals = torch.linalg.eigvalsh(h)
    top, exact_trace = float(evals[-1]), float(torch.trace(h))

    m = hessian_metrics(model, None, x, y, trace_probes=100, sam_rho=None, adaptive_rho=None)
    assert m["lambda_converged"]
    assert abs(m["lambda_max"] - top) <= 1e-4 * abs(top)
    assert m["hessian_trace_se"] > 0
    assert abs(m["hessian_trace"] - exact_trace) <= 3 * m["hessian_trace_se"]
    assert m["protocol"]["dtype"] == "float64"

    p = hessian_metrics(
        model, None, x, y, lambda_method="power", lambda_tol=1e-10, lambda_max_iters=2000, **FAST
    )
    dominant = float(evals[evals.abs().argmax()])
    assert dominant == top  # this net's dominant eigenvalue is its largest
    assert abs(p["lambda_max"] - top) <= 1e-4 * abs(top)


def test_diagonal_quadratic_is_exact() -> None:
    d = torch.tensor([3.0, -1.0, 0.5, 7.0, 2.0], dtype=torch.float64)
    model = DiagonalQuadratic(d, torch.ones(5, dtype=torch.float64))
    x, y = torch.zeros(4, 1), torch.zeros(4)
    for method in ("lanczos", "power"):
        m = hessian_metrics(
            model, output_loss, x, y, lambda_method=method, lambda_tol=1e-12, lambda_max_iters=500,
            trace_probes=10, sam_rho=None, adaptive_rho=None,
        )  # fmt: skip
        assert m["lambda_max"] == pytest.approx(7.0, rel=1e-9)
        assert m["hessian_trace"] == pytest.approx(float(d.sum()), abs=1e-12)
        assert m["hessian_trace_se"] == 0.0


def test_chunks_and_batched_probes_agree_with_whole_subset() -> None:
    model = tiny_mlp()
    x, y = data(n=50)
    whole = hessian_metrics(model, None, x, y, trace_probes=12, trace_batch_size=1, sam_steps=4)
    chunked = hessian_metrics(
        model, None, x, y, trace_probes=12, trace_batch_size=5, chunk_size=16, sam_steps=4
    )
    for key in (
        "loss",
        "lambda_max",
        "hessian_trace",
        "hessian_trace_se",
        "sam_sharpness",
        "adaptive_sharpness",
    ):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), key
    assert chunked["hvp_count"] == whole["hvp_count"]


# ----------------------------------------------------------------------------------------------
# SAM / adaptive sharpness
# ----------------------------------------------------------------------------------------------


def test_sam_multistep_beats_one_step_and_respects_bound() -> None:
    # g = d * w = (0.01, 1): the SAM step goes along e2 though the worst case lies near e1.
    d = torch.tensor([10.0, 1.0], dtype=torch.float64)
    w = torch.tensor([0.001, 1.0], dtype=torch.float64)
    model = DiagonalQuadratic(d, w)
    rho = 1.0
    m = hessian_metrics(
        model, output_loss, torch.zeros(2, 1), torch.zeros(2), sam_rho=rho, sam_steps=20, adaptive_rho=None,
        trace_probes=0, lambda_method=None,
    )  # fmt: skip
    g = d * w
    angles = torch.linspace(0, 2 * math.pi, 200001, dtype=torch.float64)
    eps = rho * torch.stack([angles.cos(), angles.sin()], 1)
    brute = float((eps @ g + 0.5 * (eps**2 @ d)).max())  # the max is on the sphere (convex loss)
    bound = rho * float(g.norm()) + 0.5 * rho**2 * float(d.max())
    one = m["sam_sharpness_one_step"]
    assert one == pytest.approx(
        rho * float(g.norm()) + 0.5 * rho**2 * float((g / g.norm()) ** 2 @ d), rel=1e-12
    )
    assert m["sam_sharpness"] >= one
    assert m["sam_sharpness"] > 2 * one  # one step badly underestimates here
    assert m["sam_sharpness"] <= bound + 1e-12
    assert m["sam_sharpness"] == pytest.approx(brute, rel=1e-3)


def test_sam_on_mlp_between_one_step_and_quadratic_bound() -> None:
    model = tiny_mlp()
    x, y = data()
    m = hessian_metrics(model, None, x, y, trace_probes=0, sam_rho=0.05, sam_steps=10)
    assert m["sam_sharpness"] >= m["sam_sharpness_one_step"] > 0
    assert m["adaptive_sharpness"] >= m["adaptive_sharpness_one_step"] > 0
    # Second-order bound with a generous margin for the third-order terms at this small radius.
    bound = 0.05 * m["grad_norm"] + 0.5 * 0.05**2 * m["lambda_max"]
    assert m["sam_sharpness"] <= 1.05 * bound


def test_rescaled_relu_net_changes_lambda_max_not_adaptive_sharpness() -> None:
    model = tiny_mlp(nn.ReLU)
    x, y = data()
    scaled = copy.deepcopy(model)
    c = 4.0
    with torch.no_grad():
        scaled[0].weight.mul_(c)
        scaled[0].bias.mul_(c)
        scaled[2].weight.div_(c)
    torch.testing.assert_close(scaled(x), model(x))
    kw = {"trace_probes": 0, "sam_rho": 0.05, "sam_steps": 10, "adaptive_rho": 0.5}
    a, b = hessian_metrics(model, None, x, y, **kw), hessian_metrics(scaled, None, x, y, **kw)
    assert b["lambda_max"] > 1.5 * a["lambda_max"]
    assert a["adaptive_sharpness"] > 0
    assert abs(a["adaptive_sharpness"] - b["adaptive_sharpness"]) <= 1e-6
    assert abs(a["adaptive_sharpness_one_step"] - b["adaptive_sharpness_one_step"]) <= 1e-6


def test_average_sharpness_optional() -> None:
    model = tiny_mlp()
    x, y = data()
    m = hessian_metrics(model, None, x, y, **FAST, average_sigma=0.01, average_samples=8)
    assert math.isfinite(m["average_sharpness"]) and m["average_sharpness_se"] > 0
    assert "average_sharpness" not in hessian_metrics(model, None, x, y, **FAST)


# ----------------------------------------------------------------------------------------------
# Cost accounting
# ----------------------------------------------------------------------------------------------


def test_hvp_count_equals_products_used(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"single": 0, "batched": 0}
    single, batched = hessian_module.LossHessian.hvp, hessian_module.LossHessian.hvp_batched

    def count_single(self, vectors):
        calls["single"] += 1
        return single(self, vectors)

    def count_batched(self, vectors):
        calls["batched"] += vectors[0].shape[0]
        return batched(self, vectors)

    monkeypatch.setattr(hessian_module.LossHessian, "hvp", count_single)
    monkeypatch.setattr(hessian_module.LossHessian, "hvp_batched", count_batched)
    model = tiny_mlp()
    x, y = data()
    m = hessian_metrics(model, None, x, y, lambda_method="power", lambda_max_iters=7, lambda_tol=0.0,
                        trace_probes=9, trace_batch_size=4, sam_steps=3)  # fmt: skip
    assert m["lambda_iterations"] == 7 and m["protocol"]["lambda_hvps"] == 7
    assert calls["single"] + calls["batched"] == m["hvp_count"] == 7 + 9
    assert m["grad_count"] == 1 + 2 * (3 - 1)  # the clean gradient + (steps - 1) per ascent
    assert m["forward_count"] == 2  # one final forward per ascent

    calls.update(single=0, batched=0)  # chunked: one product over the subset = one per chunk
    m = hessian_metrics(model, None, x, y, chunk_size=20, lambda_max_iters=5, lambda_tol=0.0,
                        trace_probes=3, trace_batch_size=1, sam_rho=None, adaptive_rho=None)  # fmt: skip
    assert m["hvp_count"] == m["lambda_iterations"] + 3
    assert calls["single"] == 4 * m["hvp_count"]  # 64 examples in chunks of 20


# ----------------------------------------------------------------------------------------------
# The protocol: eval mode, full precision, everything restored
# ----------------------------------------------------------------------------------------------


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def trained_bn_net() -> BNNet:
    torch.manual_seed(3)
    net = BNNet().double()
    x, _ = data(n=128, seed=5)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(x * 2 + 1)  # move the running statistics away from their initial values
    return net


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dtypes": [p.dtype for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert v.dtype == after["state"][k].dtype and torch.equal(v, after["state"][k]), k
    assert before["dtypes"] == after["dtypes"]
    assert before["modes"] == after["modes"]
    for g0, g1 in zip(before["grads"], after["grads"], strict=True):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)


def test_state_flags_and_rng_restored() -> None:
    model = trained_bn_net()
    model.train()
    model.drop.eval()  # mixed modes must come back as they were
    x, y = data()
    loss = F.cross_entropy(model(x), y)
    loss.backward()  # existing .grad must survive
    before = snapshot(model)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        rng = torch.get_rng_state()
        m = hessian_metrics(model, None, x, y, trace_probes=4, sam_steps=3, lambda_max_iters=10,
                            average_sigma=0.01, average_samples=2)  # fmt: skip
        assert torch.equal(torch.get_rng_state(), rng)
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
    assert_same(before, snapshot(model))
    assert m["protocol"]["mode"] == "eval" and m["protocol"]["tf32"] is False


def tf32_effectively_on() -> bool:
    """Whether cuBLAS or cuDNN may use TF32. PyTorch >= 2.9 refuses some legacy reads after the new
    API was used, so look at the per-operator settings first and fall back to the legacy flags."""
    b = torch.backends
    on = []
    for new, legacy in ((b.cuda.matmul, b.cuda.matmul), (b.cudnn.conv, b.cudnn), (b.cudnn.rnn, b.cudnn)):
        value = getattr(new, "fp32_precision", "none")
        on.append(value == "tf32" if value != "none" else bool(legacy.allow_tf32))
    return any(on)


def test_tf32_off_during_measurement_and_restored() -> None:
    seen = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((tf32_effectively_on(), torch.is_autocast_enabled("cpu"), self.training))
            return self.lin(x)

    model = Probe().train()
    x, y = data(n=8)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        assert tf32_effectively_on()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hessian_metrics(model, None, x, y, **FAST, lambda_max_iters=3)
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
    assert seen and all(s == (False, False, False) for s in seen)
    assert model.training


def test_error_inside_protocol_still_restores() -> None:
    model = trained_bn_net().train()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), measurement_protocol(model):
        with torch.no_grad():
            model.fc1.weight.add_(1.0)
        raise RuntimeError("boom")
    assert_same(before, snapshot(model))


def test_batchnorm_measured_in_eval_mode_running_stats_untouched() -> None:
    model = trained_bn_net()
    model.train()
    x, y = data()
    running = (
        model.bn.running_mean.clone(),
        model.bn.running_var.clone(),
        model.bn.num_batches_tracked.clone(),
    )
    m = hessian_metrics(model, None, x, y, **FAST)
    assert torch.equal(model.bn.running_mean, running[0]) and torch.equal(model.bn.running_var, running[1])
    assert torch.equal(model.bn.num_batches_tracked, running[2])
    assert model.training and model.bn.training
    evaluated = copy.deepcopy(model).eval()
    top_eval = float(torch.linalg.eigvalsh(exact_hessian(evaluated, x, y))[-1])
    assert m["lambda_max"] == pytest.approx(top_eval, rel=1e-4)
    top_train = float(
        torch.linalg.eigvalsh(exact_hessian(copy.deepcopy(model).train().requires_grad_(), x, y))[-1]
    )
    assert abs(top_train - top_eval) > 1e-3 * top_eval  # the mode matters, and eval was used


def test_half_precision_model_measured_in_float32_and_restored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    x, y = data()
    before = snapshot(model)
    m = hessian_metrics(model, None, x.to(torch.bfloat16), y, **FAST, lambda_max_iters=5)
    assert m["protocol"]["dtype"] == "float32"
    assert_same(before, snapshot(model))


# ----------------------------------------------------------------------------------------------
# Subset, generalization gap, tracker
# ----------------------------------------------------------------------------------------------


def test_subset_is_fixed_by_seed() -> None:
    x, y = data(n=100)
    a, b = select_subset(x, y, seed=3, subset_size=10), select_subset(x, y, seed=3, subset_size=10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape[0] == 10
    index = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:10]
    assert torch.equal(a[0], x[index])
    assert select_subset(x, y, seed=3, subset_size=1000)[0] is x
    m = hessian_metrics(tiny_mlp(), None, x, y, subset_size=10, **FAST, lambda_max_iters=3)
    assert m["protocol"]["subset_size"] == 10


def test_generalization_gap_sign() -> None:
    gap = generalization_gap({"acc": 0.99, "loss": 0.05}, {"accuracy": 0.90, "loss": 0.40})
    assert gap["gen_gap_acc"] == pytest.approx(0.09) and gap["gen_gap_loss"] == pytest.approx(0.35)
    with pytest.raises(ValueError, match="acc"):
        generalization_gap({"loss": 1.0}, {"acc": 0.5, "loss": 1.0})


def test_tracker_uses_cheap_budget_every_n_epochs() -> None:
    tracker = SharpnessTracker(every=2, options={"sam_steps": 2, "trace_probes": 3})
    model = tiny_mlp()
    x, y = data()
    for epoch in range(4):
        tracker(model, x, y, epoch=epoch)
    assert [h["epoch"] for h in tracker.history] == [0, 2]
    assert tracker.history[0]["protocol"]["trace_probes"] == 3
    assert tracker.history[0]["protocol"]["lambda_max_iters"] == sharpness.CHEAP_BUDGET["lambda_max_iters"]
