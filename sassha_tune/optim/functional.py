"""The optimizers' arithmetic as functions on lists of tensors, in the manner of ``torch.optim``'s
functional API: no state, no parameter groups, no passes; every tensor and hyperparameter is an
argument. The optimizer classes call them from ``step``, and trial packs call them on their members'
views of a stacked model (:mod:`sassha_tune.training.packs`), so each piece of math exists once.

The Hessian-vector products and Hutchinson estimates these updates consume are in :mod:`.hessian`.
Every function uses the ``_foreach`` kernels in a fixed order: two callers that pass the same
tensors get bitwise the same result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import global_grad_norm

__all__ = [
    "sam_perturbation",
    "due_for_refresh",
    "decoupled_weight_decay_",
    "ema_",
    "sassha_update_",
    "sassha_lm_update_",
    "adahessian_update_",
    "sophia_update_",
    "conv_kernel_average",
]


def sam_perturbation(
    params: list[list[Tensor]],
    grads: list[list[Tensor]],
    rhos: list[float],
    perturb_eps: list[float],
    *,
    adaptive: bool = False,
    inplace: bool = False,
) -> list[list[Tensor]]:
    """The SAM ascent step ``e``, per parameter group: the one implementation SAM, SASSHA and M-SASSHA share.

    ``e = rho * g / (||g|| + perturb_eps)`` with ``||g||`` the global L2 norm over **all** groups
    (the norm of the per-tensor norms), ``rho`` and ``perturb_eps`` taken per group. With
    ``adaptive`` (ASAM): ``e = rho * theta**2 * g / (|| |theta| * g || + perturb_eps)``.
    ``inplace=True`` writes ``e`` into the ``grads`` tensors (use it when they are not needed
    afterwards: no extra parameter-sized buffers). Returns ``e`` as lists parallel to ``params``.
    """
    flat_p = [p for group in params for p in group]
    flat_g = [g for group in grads for g in group]
    if not flat_g:
        return [[] for _ in params]
    if adaptive:
        weighted = torch._foreach_mul(torch._foreach_abs(flat_p), flat_g)
        norm = global_grad_norm(weighted)
        del weighted
    else:
        norm = global_grad_norm(flat_g)
    out = []
    for ps, gs, rho, peps in zip(params, grads, rhos, perturb_eps, strict=True):
        if not gs:
            out.append([])
            continue
        scale = (rho / (norm + peps)).to(gs[0].device)
        if inplace:
            torch._foreach_mul_(gs, scale)
            es = list(gs)
        else:
            es = list(torch._foreach_mul(gs, scale))
        if adaptive:
            torch._foreach_mul_(es, torch._foreach_mul(ps, ps))
        out.append(es)
    return out


def due_for_refresh(hessian_step: int, lazy_hessian: int, dense_refresh_steps: int = 0) -> bool:
    """Whether a parameter with ``hessian_step`` gradient steps so far gets a new Hessian estimate now.

    The reference schedule refreshes at h = 0, k, 2k, ... (``lazy_hessian`` = k). The dense start
    (``dense_refresh_steps`` = N, off by default as in the reference) also refreshes at every
    h < N: with lazy refreshes the first one-probe estimate is used for k steps, and where it is
    near zero the step is lr * m / eps; on models without normalization layers that blows up within
    ~10 steps (docs/optimizer.md, "Dense start"). Refreshing every step for a while lets the EMA
    average many probes and follow the early, fast-changing curvature first.
    """
    return hessian_step < dense_refresh_steps or hessian_step % lazy_hessian == 0


def decoupled_weight_decay_(params: list[Tensor], *, lr: float, weight_decay: float) -> None:
    """``theta <- theta * (1 - lr * weight_decay)`` in place (nothing when ``weight_decay`` is 0)."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)


def ema_(averages: list[Tensor], values: Sequence[Tensor], *, beta: float) -> None:
    """``a <- beta * a + (1 - beta) * x`` in place, element-wise over the lists."""
    torch._foreach_mul_(averages, beta)
    torch._foreach_add_(averages, list(values), alpha=1.0 - beta)


def sassha_update_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_hessian_diags: list[Tensor],
    bias_corrections2: list[float],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    eps: float,
    alpha: float,
) -> None:
    """SASSHA's (and M-SASSHA's) preconditioned step, in place on ``params``:
    ``theta <- theta - lr / (1 - beta1^t) * m / (v^alpha / c + eps)``.

    ``m``: the gradient EMA, ``v``: the EMA of |diag H| estimates, ``c = (1 - beta2^t')^alpha`` the
    bias correction frozen at the last refresh, ``t`` the step count of each parameter.
    """
    denom = torch._foreach_pow(exp_hessian_diags, alpha)
    torch._foreach_div_(denom, bias_corrections2)
    torch._foreach_add_(denom, eps)
    step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def sassha_lm_update_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_hessian_diags: list[Tensor],
    *,
    lr: float,
    eps: float,
    alpha: float,
) -> None:
    """The language-model SASSHA step (no bias correction of either moment), in place:
    ``theta <- theta - lr * m / (v^alpha + eps)``."""
    denom = torch._foreach_pow(exp_hessian_diags, alpha)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)


def adahessian_update_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_hessian_sq: list[Tensor],
    hessians: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    hessian_power: float,
) -> None:
    """AdaHessian's step, in place: ``v <- beta2 v + (1 - beta2) h^2`` (``h``: the latest stored
    estimate), then ``theta <- theta - lr / (1 - beta1^t) * m / ((v / (1 - beta2^t))^(k/2) + eps)``."""
    torch._foreach_mul_(exp_hessian_sq, beta2)
    torch._foreach_addcmul_(exp_hessian_sq, hessians, hessians, value=1.0 - beta2)
    denom = torch._foreach_div(exp_hessian_sq, [1.0 - beta2**t for t in steps])
    torch._foreach_pow_(denom, hessian_power / 2)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**t) for t in steps])


def sophia_update_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_hessian_diags: list[Tensor],
    *,
    lr: float,
    eps: float,
    clip_threshold: float,
) -> None:
    """Sophia-H's clipped step, in place: ``theta <- theta - lr * sign(m) * min(|m| / (gamma * max(v, 0) + eps), 1)``."""
    denom = torch._foreach_clamp_min(exp_hessian_diags, 0.0)
    torch._foreach_mul_(denom, clip_threshold)
    torch._foreach_add_(denom, eps)
    ratio = torch._foreach_abs(exp_avgs)
    torch._foreach_div_(ratio, denom)
    torch._foreach_clamp_max_(ratio, 1.0)
    torch._foreach_mul_(ratio, torch._foreach_sign(exp_avgs))
    torch._foreach_add_(params, ratio, alpha=-lr)


def conv_kernel_average(estimate: Tensor) -> Tensor:
    """AdaHessian's spatial averaging: for a 4-D (convolution) weight, the mean of |h| over the
    kernel's spatial dimensions, broadcast back; other shapes unchanged."""
    if estimate.dim() != 4:
        return estimate
    return estimate.abs().mean(dim=(2, 3), keepdim=True).expand_as(estimate)
