"""The step protocol every optimizer in sassha-tune follows.

``optimizer.step(closure)``: ``closure()`` runs the model on the *current* batch and returns the
loss; it does not call ``backward``. The optimizer clears the gradients, calls ``backward`` itself
as often as its method needs (one pass for SGD/AdamW, two for SAM and SASSHA, with
``create_graph`` only on the steps that take a Hessian-vector product), updates the parameters
and returns the loss of the first (clean) pass, detached.

So the trainer, and a user's own loop, is the same for every optimizer::

    for x, y in batches:
        loss = optimizer.step(lambda: loss_fn(model(x), y))

Two-pass optimizers evaluate the closure a second time at perturbed weights. That pass must not
move BatchNorm running statistics: pass ``model=`` to the optimizer, or wrap the second call
yourself with :func:`frozen_running_stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

Closure = Callable[[], Tensor]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


@contextmanager
def frozen_running_stats(model: nn.Module | None) -> Iterator[None]:
    """Run forward passes in train mode without touching BatchNorm running statistics.

    Inside, each BatchNorm layer normalizes with the statistics of the current batch (as in any
    training-mode forward) but neither ``running_mean``/``running_var`` nor
    ``num_batches_tracked`` change. (Setting momentum to 0, as the reference code does, leaves the
    running averages unchanged too but still increments ``num_batches_tracked``.)
    """
    if model is None:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, _NORM_TYPES) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def second_pass_context(model: nn.Module | None):
    """The context for a perturbed (second) pass: running statistics frozen when the model is known."""
    return frozen_running_stats(model) if model is not None else nullcontext()


def clear_grads(params: list[Tensor]) -> None:
    for p in params:
        p.grad = None


def trainable(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """All parameters of all groups, in ``param_groups`` order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def check_positive(name: str, value: float, *, allow_zero: bool = True) -> None:
    """Raise ``ValueError`` naming the argument when a hyperparameter is out of range."""
    bad = value < 0 or (value == 0 and not allow_zero)
    if bad or value != value:  # value != value catches NaN
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")


def check_betas(betas: tuple[float, ...], *, name: str = "betas") -> None:
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid {name}[{i}]: {beta!r} (expected 0 <= beta < 1)")


def global_grad_norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm over a list of tensors, computed as the norm of the per-tensor norms (on the first one's device)."""
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def clip_grads_(grads: list[Tensor], max_norm: float | None, *, eps: float = 1e-6) -> Tensor | None:
    """Scale ``grads`` in place so that their global L2 norm is at most ``max_norm``; returns the norm before.

    The same rule as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + eps)``,
    capped at 1), but on an explicit list of gradient tensors, so an optimizer can clip the gradient
    its update uses (after its last backward) whatever attribute holds it. ``None`` or no tensors:
    nothing happens and ``None`` is returned.
    """
    if max_norm is None or not grads:
        return None
    total = global_grad_norm(grads)
    coef = torch.clamp(max_norm / (total + eps), max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


def check_max_grad_norm(max_grad_norm: float | None) -> None:
    if max_grad_norm is not None:
        check_positive("max_grad_norm", max_grad_norm, allow_zero=False)


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
