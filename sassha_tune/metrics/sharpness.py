"""Sharpness and generalization metrics, measured under one fixed protocol.

:func:`hessian_metrics` measures, on a fixed seeded subset of the (un-augmented) training data:

* ``lambda_max``: the top Hessian eigenvalue (Lanczos with full reorthogonalization, or power
  iteration);
* ``hessian_trace`` and ``hessian_trace_se``: Hutchinson's estimate with Rademacher probes and its
  standard error;
* ``sam_sharpness``: the worst loss increase in the L2 ball of radius ``sam_rho`` found by projected
  multi-step ascent (``sam_sharpness_one_step``: the single SAM step);
* ``adaptive_sharpness``: the same over the ASAM ball ``{e : ||e / |w| ||_2 <= adaptive_rho}``,
  invariant to rescalings of the weights that leave the network's function unchanged;
* optionally ``average_sharpness``: the mean loss increase under Gaussian weight noise.

The protocol is the same for every call (see ``docs/metrics.md``): model in eval mode, full
precision (autocast and TF32 off; half-precision models are measured on a float32 copy of their
weights, float64 models stay float64), all Hessian-vector products on the same subset, and
afterwards the model's parameters, buffers, ``.grad``, train/eval flags, the TF32 settings and the
global RNG state are exactly as before.

All Hessian-vector products go through :mod:`sassha_tune.optim.hessian`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sassha_tune.devices import onednn_workaround
from sassha_tune.optim.base import double_backward_context
from sassha_tune.optim.hessian import LossHessian, make_generator, rademacher_probes

__all__ = [
    "CHEAP_BUDGET",
    "SharpnessTracker",
    "generalization_gap",
    "hessian_metrics",
    "measurement_protocol",
    "select_subset",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: A cheaper budget for measurements taken every few epochs during training (plots), same protocol.
CHEAP_BUDGET: dict[str, Any] = {
    "lambda_max_iters": 30,
    "lambda_tol": 1e-3,
    "trace_probes": 20,
    "sam_steps": 5,
}

# Offsets added to ``seed`` so that each estimator has its own private stream.
_TRACE_STREAM = 0
_LANCZOS_STREAM = 1
_AVERAGE_STREAM = 2

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# The measurement protocol: eval mode, full precision, everything restored afterwards.
# --------------------------------------------------------------------------------------------


def _tf32_off() -> Callable[[], None]:
    """Turn TF32 off for cuBLAS matmuls and cuDNN; return a function that restores the settings.

    PyTorch >= 2.9 has two APIs for this (``allow_tf32`` and ``fp32_precision``) and refuses to
    read the legacy flags once the new one was used. Use the legacy API when it can be read, the
    new one otherwise, and restore every setting of both that exists.
    """
    b = torch.backends
    new_api = [
        (obj, "fp32_precision")
        for obj in (b, b.cuda.matmul, b.cudnn, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None))
        if obj is not None and hasattr(obj, "fp32_precision")
    ]
    saved_new = [(obj, getattr(obj, attr)) for obj, attr in new_api]
    try:
        matmul_precision = torch.get_float32_matmul_precision()
        cudnn_tf32 = b.cudnn.allow_tf32
        legacy = True
    except RuntimeError:  # the user set TF32 through the new API
        legacy = False
    if legacy:
        b.cuda.matmul.allow_tf32 = False
        b.cudnn.allow_tf32 = False
    else:
        for obj in (b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn):
            obj.fp32_precision = "ieee"

    def restore() -> None:
        if legacy:
            torch.set_float32_matmul_precision(matmul_precision)
            b.cudnn.allow_tf32 = cudnn_tf32
        for obj, value in saved_new:
            obj.fp32_precision = value

    return restore


def _rng_state() -> Callable[[], None]:
    cpu = torch.get_rng_state()
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )

    def restore() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return restore


@contextmanager
def measurement_protocol(model: nn.Module) -> Iterator[None]:
    """Measure ``model`` in eval mode and full precision, and leave everything as it was.

    Inside: every module in eval mode; autocast disabled (CPU and CUDA); TF32 off; gradients
    enabled; attention on its double-differentiable kernel
    (:func:`sassha_tune.optim.base.double_backward_context`); float16/bfloat16 parameters and
    buffers replaced by float32 copies; oneDNN off where
    torch cannot differentiate the model with it (:func:`sassha_tune.devices.onednn_workaround`). On exit (also on
    error): parameter and buffer values *and dtypes*, ``.grad``, every module's ``training`` flag,
    the TF32 settings and the CPU/CUDA RNG states are restored exactly.
    """
    modes = [(m, m.training) for m in model.modules()]
    tensors = list(model.parameters()) + list(model.buffers())
    saved = [(t, t.detach().clone()) for t in tensors]
    grads = [(p, p.grad) for p in model.parameters()]
    restore_rng = _rng_state()
    restore_tf32 = _tf32_off()
    try:
        with ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(onednn_workaround(model))
            stack.enter_context(double_backward_context())
            model.eval()
            with torch.no_grad():
                for t in tensors:
                    if t.dtype in _LOW_PRECISION:
                        t.data = t.data.float()
            yield
    finally:
        with torch.no_grad():
            for t, copy in saved:
                if t.dtype != copy.dtype:  # upcast above: back to the original dtype
                    t.data = copy
                else:
                    t.copy_(copy)
        for p, g in grads:
            p.grad = g
        for m, flag in modes:
            m.training = flag
        restore_tf32()
        restore_rng()


# --------------------------------------------------------------------------------------------
# The loss on the subset, its gradient and Hessian-vector products, chunked.
# --------------------------------------------------------------------------------------------


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for p in like:
        n = p.numel()
        out.append(vector[start : start + n].view_as(p))
        start += n
    return out


class _SubsetObjective:
    """L_S(w) = size-weighted mean of the chunk losses; H v = size-weighted mean of chunk products.

    With a single chunk the gradient graph is built once and reused by every product. With several
    chunks each product rebuilds one chunk's graph at a time, so memory stays at one chunk's worth.
    ``hvp_count`` counts products over the whole subset, ``grad_count`` full-subset gradients and
    ``forward_count`` full-subset loss evaluations without gradient.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, chunk_size: int | None
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("hessian_metrics: the model has no trainable parameters")
        n = inputs.shape[0]
        size = n if chunk_size is None else int(chunk_size)
        if size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunks = [
            (inputs[i : i + size], targets[i : i + size], min(size, n - i) / n) for i in range(0, n, size)
        ]
        self._cached: LossHessian | None = None
        self.hvp_count = 0
        self.grad_count = 0
        self.forward_count = 0

    def _hessians(self) -> Iterator[tuple[LossHessian, float]]:
        if len(self.chunks) == 1:
            if self._cached is None:
                x, y, _ = self.chunks[0]
                self._cached = LossHessian(self.model, self.loss_fn, x, y)
            yield self._cached, 1.0
            return
        for x, y, weight in self.chunks:
            yield LossHessian(self.model, self.loss_fn, x, y), weight

    def release(self) -> None:
        """Free the cached graph (needed before the parameters are perturbed in place)."""
        self._cached = None

    def _weighted_sum(self, product: Callable[[LossHessian], list[Tensor]]) -> list[Tensor]:
        """Sum over chunks of ``weight * product(chunk_hessian)``."""
        total = None
        for hessian, weight in self._hessians():
            products = product(hessian)
            if total is None:
                total = [hv.mul_(weight) for hv in products]
            else:
                torch._foreach_add_(total, products, alpha=weight)
        return total

    def hvp(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        total = self._weighted_sum(lambda hessian: hessian.hvp(vectors))
        self.hvp_count += 1
        return total

    def hvp_batched(self, batched: Sequence[Tensor]) -> list[Tensor]:
        total = self._weighted_sum(lambda hessian: hessian.hvp_batched(batched))
        self.hvp_count += batched[0].shape[0]
        return total

    def loss(self) -> float:
        with torch.no_grad():
            total = sum(w * float(self.loss_fn(self.model(x), y)) for x, y, w in self.chunks)
        self.forward_count += 1
        return total

    def loss_and_grad(self) -> tuple[float, Tensor]:
        """The loss and the flat gradient at the current parameters."""
        total_loss, total_grad = 0.0, None
        for x, y, weight in self.chunks:
            loss = self.loss_fn(self.model(x), y)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            flat = _flat(
                [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params, strict=True)]
            )
            total_loss += weight * float(loss.detach())
            total_grad = flat.mul_(weight) if total_grad is None else total_grad.add_(flat, alpha=weight)
        self.grad_count += 1
        return total_loss, total_grad


# --------------------------------------------------------------------------------------------
# Estimators.
# --------------------------------------------------------------------------------------------


def _lanczos_top(
    objective: _SubsetObjective, generator: torch.Generator, *, tol: float, max_iters: int
) -> tuple[float, int, bool, float]:
    """Top eigenvalue by Lanczos with full reorthogonalization.

    Stops when the top Ritz value changes by at most ``tol`` relative between two iterations (not
    before the third), when an invariant subspace is found (then the Ritz values are exact), or
    after ``max_iters`` products. Returns (value, iterations, converged, relative residual
    ``beta * |s_last| / |theta|``). Stores ``iterations x D`` floats.
    """
    params = objective.params
    dim = sum(p.numel() for p in params)
    ref = params[0]
    v = torch.randn(dim, generator=generator, device=ref.device, dtype=ref.dtype)
    v /= v.norm()
    basis = torch.empty(min(max_iters, dim, 32), dim, device=ref.device, dtype=ref.dtype)
    alphas: list[float] = []
    betas: list[float] = []
    theta_prev = None
    theta, residual, converged = float("nan"), float("nan"), False
    beta_prev, v_prev = 0.0, None
    for j in range(min(max_iters, dim)):
        if j >= basis.shape[0]:  # grow the stored basis geometrically
            grown = torch.empty(min(2 * basis.shape[0], dim), dim, device=ref.device, dtype=ref.dtype)
            grown[:j] = basis[:j]
            basis = grown
        basis[j] = v
        w = _flat(objective.hvp(_unflat(v, params)))
        alpha = float(torch.dot(w, v))
        w -= alpha * v
        if v_prev is not None:
            w -= beta_prev * v_prev
        q = basis[: j + 1]
        for _ in range(2):  # full reorthogonalization, twice for stability
            w -= q.T @ (q @ w)
        beta = float(w.norm())
        alphas.append(alpha)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if j > 0:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        theta = float(evals[-1])
        residual = beta * abs(float(evecs[-1, -1])) / max(abs(theta), 1e-30)
        iterations = j + 1
        if beta <= 1e-10 * max(abs(theta), 1e-30) or iterations == dim:
            converged = True  # invariant subspace: the Ritz values are eigenvalues
            break
        if theta_prev is not None and j >= 2 and abs(theta - theta_prev) <= tol * abs(theta):
            converged = True
            break
        theta_prev = theta
        betas.append(beta)
        beta_prev, v_prev = beta, v
        v = w / beta
    return theta, iterations, converged, residual


def _power_top(
    objective: _SubsetObjective, generator: torch.Generator, *, tol: float, max_iters: int
) -> tuple[float, int, bool, float]:
    """Dominant eigenvalue (largest |lambda|, signed) by power iteration with Rayleigh quotients."""
    params = objective.params
    ref = params[0]
    dim = sum(p.numel() for p in params)
    v = torch.randn(dim, generator=generator, device=ref.device, dtype=ref.dtype)
    v /= v.norm()
    theta_prev, theta, converged, residual, iterations = None, float("nan"), False, float("nan"), 0
    for j in range(max_iters):
        w = _flat(objective.hvp(_unflat(v, params)))
        iterations = j + 1
        theta = float(torch.dot(w, v))
        norm = float(w.norm())
        residual = float((w - theta * v).norm()) / max(abs(theta), 1e-30)
        if norm == 0.0:
            converged = True
            break
        if theta_prev is not None and abs(theta - theta_prev) <= tol * abs(theta):
            converged = True
            break
        theta_prev = theta
        v = w / norm
    return theta, iterations, converged, residual


def _hutchinson_trace(
    objective: _SubsetObjective, generator: torch.Generator, *, probes: int, batch: int
) -> tuple[float, float]:
    """Mean and standard error (std / sqrt(K)) of z^T H z over ``probes`` Rademacher probes."""
    params = objective.params
    values: list[Tensor] = []
    done = 0
    while done < probes:
        b = min(batch, probes - done)
        draws = [rademacher_probes(params, generator) for _ in range(b)]  # same stream as one by one
        if b == 1:
            products = objective.hvp(draws[0])
            values.append(sum((z * hz).sum() for z, hz in zip(draws[0], products, strict=True)).reshape(1))
        else:
            stacked = [torch.stack([d[i] for d in draws]) for i in range(len(params))]
            products = objective.hvp_batched(stacked)
            values.append(sum((z * hz).flatten(1).sum(1) for z, hz in zip(stacked, products, strict=True)))
        done += b
    per_probe = torch.cat(values).double()
    mean = float(per_probe.mean())
    se = float(per_probe.std(unbiased=True)) / math.sqrt(probes) if probes > 1 else float("nan")
    return mean, se


def _set_params(params: Sequence[Tensor], flat: Tensor) -> None:
    with torch.no_grad():
        for p, value in zip(params, _unflat(flat, params), strict=True):
            p.copy_(value)


def _ascent(
    objective: _SubsetObjective,
    w0: Tensor,
    base_loss: float,
    base_grad: Tensor,
    *,
    rho: float,
    steps: int,
    scale: Tensor | None,
    step_fraction: float,
) -> tuple[float, float]:
    """Projected normalized-gradient ascent on L(w0 + scale * d) over ``||d||_2 <= rho``.

    ``scale=None`` is the plain L2 ball (SAM); ``scale=|w0|`` the ASAM ball. Step 1 is the SAM step
    ``d = rho * g_d / ||g_d||`` (its loss increase is returned as the one-step value); later steps
    move by ``step_fraction * rho`` along the normalized gradient and project back onto the ball,
    and the step is halved (restarting from the best point) whenever the loss does not increase.
    Returns (best increase over all ``steps`` iterates, one-step increase). Costs ``steps - 1``
    gradients and one forward pass beyond the gradient at w0 the caller supplies.
    """

    def d_grad(g: Tensor) -> Tensor:  # gradient w.r.t. d of L(w0 + scale * d)
        return g if scale is None else g * scale

    def step(d: Tensor, g: Tensor, size: float) -> Tensor:
        gd = d_grad(g)
        norm = float(gd.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return d
        d = d + (size / norm) * gd
        dn = float(d.norm())
        return d * (rho / dn) if dn > rho else d

    def point(d: Tensor) -> Tensor:
        return w0 + (d if scale is None else scale * d)

    d = step(torch.zeros_like(w0), base_grad, rho)
    best_loss, best_d, best_g, one_step = None, d, base_grad, None
    size = step_fraction * rho
    for t in range(1, steps + 1):
        _set_params(objective.params, point(d))
        if t < steps:
            loss, g = objective.loss_and_grad()
        else:
            loss, g = objective.loss(), None
        if one_step is None:
            one_step = loss - base_loss
        if best_loss is None or loss > best_loss:
            best_loss, best_d, best_g = loss, d, g
        else:
            size *= 0.5
        if t < steps:
            d = step(best_d, best_g, size)
    _set_params(objective.params, w0)
    return best_loss - base_loss, one_step


def _average_sharpness(
    objective: _SubsetObjective,
    w0: Tensor,
    base_loss: float,
    generator: torch.Generator,
    *,
    sigma: float,
    samples: int,
    scale: Tensor | None,
) -> tuple[float, float]:
    increases = []
    for _ in range(samples):
        noise = torch.randn(w0.shape, generator=generator, device=w0.device, dtype=w0.dtype) * sigma
        _set_params(objective.params, w0 + (noise if scale is None else noise * scale))
        increases.append(objective.loss() - base_loss)
    _set_params(objective.params, w0)
    values = torch.tensor(increases, dtype=torch.float64)
    se = float(values.std(unbiased=True)) / math.sqrt(samples) if samples > 1 else float("nan")
    return float(values.mean()), se


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def select_subset(
    inputs: Tensor, targets: Tensor, *, seed: int, subset_size: int | None
) -> tuple[Tensor, Tensor]:
    """The fixed subset: all of ``inputs`` if it has at most ``subset_size`` rows, otherwise the first
    ``subset_size`` indices of ``randperm(len(inputs))`` drawn from ``torch.Generator().manual_seed(seed)``
    (on the CPU, so the subset does not depend on the device)."""
    n = inputs.shape[0]
    if targets.shape[0] != n:
        raise ValueError(f"inputs and targets differ in length: {n} vs {targets.shape[0]}")
    if subset_size is None or n <= subset_size:
        return inputs, targets
    generator = torch.Generator().manual_seed(int(seed))
    index = torch.randperm(n, generator=generator)[:subset_size]
    return inputs[index.to(inputs.device)], targets[index.to(targets.device)]


def _check_estimators(lambda_method: str | None, ascent_step: float) -> None:
    if lambda_method not in ("lanczos", "power", None):
        raise ValueError(f"lambda_method must be 'lanczos', 'power' or None, got {lambda_method!r}")
    if not 0.0 < ascent_step <= 1.0:
        raise ValueError(f"ascent_step must be in (0, 1], got {ascent_step}")


def _single_float_dtype(params: list[Tensor]) -> torch.dtype | None:
    """The floating dtype of all of ``params``; None when they mix several."""
    float_dtypes = {p.dtype for p in params if p.is_floating_point()}
    return float_dtypes.pop() if len(float_dtypes) == 1 else None


def _top_eigenvalue(
    objective: _SubsetObjective, method: str | None, seed: int, device: torch.device, *, tol: float, max_iters: int
) -> tuple[float, int, bool, float]:
    """``lambda_max`` by ``method`` (``_lanczos_top`` or ``_power_top``); NaN when it is off."""
    if method is None or max_iters <= 0:
        return float("nan"), 0, False, float("nan")
    top = _lanczos_top if method == "lanczos" else _power_top
    return top(objective, make_generator(seed + _LANCZOS_STREAM, device), tol=tol, max_iters=max_iters)


def _trace(
    objective: _SubsetObjective, seed: int, device: torch.device, *, probes: int, batch: int
) -> tuple[float, float]:
    """Hutchinson's trace estimate and its standard error; NaNs without probes."""
    if probes <= 0:
        return float("nan"), float("nan")
    return _hutchinson_trace(
        objective, make_generator(seed + _TRACE_STREAM, device), probes=probes, batch=max(1, int(batch))
    )


def _ascent_in_ball(
    objective: _SubsetObjective,
    w0: Tensor,
    base_loss: float,
    base_grad: Tensor,
    *,
    rho: float | None,
    adaptive: bool,
    steps: int,
    step_fraction: float,
) -> tuple[float, float]:
    """:func:`_ascent` in the ball of radius ``rho``, measured relative to ``|w|`` if ``adaptive``;
    NaNs when ``rho`` or ``steps`` turn it off."""
    if rho is None or rho <= 0 or steps <= 0:
        return float("nan"), float("nan")
    scale = w0.abs() if adaptive else None
    return _ascent(objective, w0, base_loss, base_grad, rho=rho, steps=steps, scale=scale, step_fraction=step_fraction)


def _average(
    objective: _SubsetObjective,
    w0: Tensor,
    base_loss: float,
    seed: int,
    device: torch.device,
    *,
    sigma: float | None,
    samples: int,
    adaptive: bool,
) -> dict[str, float]:
    """``average_sharpness`` and its standard error (noise times ``|w|`` if ``adaptive``); nothing
    when ``sigma`` or ``samples`` turn it off."""
    if sigma is None or sigma <= 0 or samples <= 0:
        return {}
    avg, avg_se = _average_sharpness(
        objective,
        w0,
        base_loss,
        make_generator(seed + _AVERAGE_STREAM, device),
        sigma=sigma,
        samples=samples,
        scale=w0.abs() if adaptive else None,
    )
    return {"average_sharpness": avg, "average_sharpness_se": avg_se}


def hessian_metrics(
    model: nn.Module,
    loss_fn: LossFn | None,
    inputs: Tensor,
    targets: Tensor,
    *,
    seed: int = 0,
    subset_size: int | None = 1024,
    chunk_size: int | None = None,
    lambda_method: str | None = "lanczos",
    lambda_tol: float = 1e-4,
    lambda_max_iters: int = 100,
    trace_probes: int = 100,
    trace_batch_size: int | None = None,
    sam_rho: float | None = 0.05,
    sam_steps: int = 20,
    adaptive_rho: float | None = 0.5,
    ascent_step: float = 0.5,
    average_sigma: float | None = None,
    average_samples: int = 20,
    average_adaptive: bool = False,
) -> dict[str, Any]:
    """Sharpness metrics of ``loss_fn(model(x), y)`` on a fixed subset of ``(inputs, targets)``.

    Pass the raw, un-augmented training tensors; ``loss_fn`` must return the *mean* loss over its
    batch (``None``: ``F.cross_entropy``). The subset is :func:`select_subset`; with ``chunk_size``
    it is processed in chunks of that many examples (loss, gradient and every Hessian-vector
    product are size-weighted means over chunks), which bounds memory. Everything runs inside
    :func:`measurement_protocol`.

    Estimators (set ``lambda_method=None``, ``trace_probes=0``, ``sam_rho=None`` or
    ``adaptive_rho=None`` to skip one; its value is then NaN):

    * ``lambda_max``: ``"lanczos"`` (full reorthogonalization; the algebraically largest eigenvalue)
      or ``"power"`` (the dominant one, largest |lambda|); stops on a relative change of the top
      estimate <= ``lambda_tol`` or after ``lambda_max_iters`` products.
    * ``hessian_trace`` / ``hessian_trace_se``: Hutchinson with ``trace_probes`` Rademacher probes from
      ``make_generator(seed)``, ``trace_batch_size`` probes per vectorized product (default: 1 on
      the CPU, 10 on accelerators).
    * ``sam_sharpness`` (``sam_steps`` iterates of projected ascent, best kept) and
      ``sam_sharpness_one_step``, both in the L2 ball of radius ``sam_rho``.
    * ``adaptive_sharpness`` / ``adaptive_sharpness_one_step``: the same in the ball
      ``||e / |w| ||_2 <= adaptive_rho``. The default 0.5 is ASAM's CIFAR-10 radius (Kwon et al.
      2021): the ball is measured in relative weight change, so it needs a radius ~10x SAM's 0.05.
    * ``average_sharpness`` / ``average_sharpness_se`` (only if ``average_sigma`` is set): mean loss
      increase over ``average_samples`` draws of ``N(0, sigma^2)`` weight noise (times ``|w|`` if
      ``average_adaptive``).

    Returns a flat dict of floats/ints (``loss``, the metrics above, ``hvp_count``, ``grad_count``,
    ``forward_count``, ``seconds``, ``lambda_iterations``, ``lambda_converged``,
    ``lambda_residual``) plus ``protocol``, a dict describing how they were measured.
    """
    _check_estimators(lambda_method, ascent_step)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    start = time.perf_counter()
    x, y = select_subset(inputs, targets, seed=seed, subset_size=subset_size)
    with measurement_protocol(model):
        params = [p for p in model.parameters() if p.requires_grad]
        dtype = _single_float_dtype(params)
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        objective = _SubsetObjective(model, loss_fn, x, y, chunk_size)
        device = params[0].device
        if trace_batch_size is None:
            trace_batch_size = 1 if device.type == "cpu" else 10

        lam, iters, converged, residual = _top_eigenvalue(
            objective, lambda_method, seed, device, tol=lambda_tol, max_iters=lambda_max_iters
        )
        lambda_hvps = objective.hvp_count
        trace, trace_se = _trace(objective, seed, device, probes=trace_probes, batch=trace_batch_size)
        objective.release()  # the graph must go before the weights are perturbed in place

        base_loss, base_grad = objective.loss_and_grad()
        w0 = _flat([p.detach() for p in params]).clone()
        ascent = partial(_ascent_in_ball, objective, w0, base_loss, base_grad, steps=sam_steps, step_fraction=ascent_step)
        sam, sam_one = ascent(rho=sam_rho, adaptive=False)
        adaptive, adaptive_one = ascent(rho=adaptive_rho, adaptive=True)
        out: dict[str, Any] = dict(
            loss=base_loss,
            grad_norm=float(base_grad.norm()),
            lambda_max=lam,
            lambda_iterations=iters,
            lambda_converged=converged,
            lambda_residual=residual,
            hessian_trace=trace,
            hessian_trace_se=trace_se,
            sam_sharpness=sam,
            sam_sharpness_one_step=sam_one,
            adaptive_sharpness=adaptive,
            adaptive_sharpness_one_step=adaptive_one,
        )
        out.update(_average(objective, w0, base_loss, seed, device, sigma=average_sigma, samples=average_samples,
                            adaptive=average_adaptive))
        measured_dtype = str(dtype).replace("torch.", "") if dtype is not None else "mixed"
        out.update(
            hvp_count=objective.hvp_count,
            grad_count=objective.grad_count,
            forward_count=objective.forward_count,
            num_params=int(w0.numel()),
        )
    out["seconds"] = time.perf_counter() - start
    out["protocol"] = {
        "subset_size": int(x.shape[0]),
        "subset_seed": int(seed),
        "chunk_size": None if chunk_size is None else int(chunk_size),
        "mode": "eval",
        "dtype": measured_dtype,
        "autocast": False,
        "tf32": False,
        "lambda_method": lambda_method,
        "lambda_tol": lambda_tol,
        "lambda_max_iters": lambda_max_iters,
        "lambda_hvps": lambda_hvps,
        "trace_probes": trace_probes,
        "trace_batch_size": int(trace_batch_size),
        "sam_rho": sam_rho,
        "adaptive_rho": adaptive_rho,
        "ascent_steps": sam_steps,
        "ascent": f"projected normalized-gradient ascent, step {ascent_step}*rho, halved on no increase",
        "adaptive_scale": "|w|",
        "average_sigma": average_sigma,
        "average_samples": average_samples if average_sigma else 0,
        "average_adaptive": average_adaptive,
    }
    return out


def _metric(d: dict[str, Any], names: Sequence[str], which: str) -> float:
    for name in names:
        if name in d:
            return float(d[name])
    raise ValueError(
        f"generalization_gap: the {which} metrics need one of {list(names)}, got keys {sorted(d)}"
    )


def generalization_gap(train: dict[str, Any], held_out: dict[str, Any]) -> dict[str, float]:
    """``gen_gap_acc = train_acc - held_out_acc`` and ``gen_gap_loss = held_out_loss - train_loss``.

    Both are positive when the model does better on the training data than on held-out data
    (overfitting). Pass train metrics measured on the un-augmented training set in eval mode (not
    the running training-loop average). Keys: ``acc`` (or ``accuracy``) and ``loss``.
    """
    acc_keys, loss_keys = ("acc", "accuracy"), ("loss",)
    return {
        "gen_gap_acc": _metric(train, acc_keys, "train") - _metric(held_out, acc_keys, "held-out"),
        "gen_gap_loss": _metric(held_out, loss_keys, "held-out") - _metric(train, loss_keys, "train"),
    }


@dataclass
class SharpnessTracker:
    """Sharpness during training, for plots: call it every epoch; it measures every ``every`` epochs.

    ``tracker(model, inputs, targets, epoch=e)`` runs :func:`hessian_metrics` with
    :data:`CHEAP_BUDGET` (overridden by ``options``) on the same protocol and appends the result,
    with ``epoch``, to ``history``. Returns the metrics, or ``None`` when it skipped this epoch.
    """

    loss_fn: LossFn | None = None
    every: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def __call__(
        self, model: nn.Module, inputs: Tensor, targets: Tensor, *, epoch: int | None = None
    ) -> dict[str, Any] | None:
        if epoch is not None and self.every > 1 and epoch % self.every != 0:
            return None
        metrics = hessian_metrics(model, self.loss_fn, inputs, targets, **{**CHEAP_BUDGET, **self.options})
        metrics["epoch"] = epoch
        self.history.append(metrics)
        return metrics
