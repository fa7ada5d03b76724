"""M-SASSHA: SASSHA with a momentum-SAM perturbation (one forward/backward per step).

Written from a description of the algorithm (``docs/optimizer.md``). The published ``msassha.py`` cannot run (undefined
attributes, a module-global bias correction); this is a working implementation of the algorithm
it describes.

Design (where the weights are): the reference leaves the model at the *perturbed* point
``θ̃ = θ − c·m`` between steps and asks the training loop to move the weights back before every
evaluation. Here the weights are at θ whenever ``step()`` is not running: each step applies
the perturbation, runs the single pass at θ̃, takes the Hessian there, removes the perturbation
and updates θ. The trajectory is the reference's (up to rounding of the add/subtract), evaluation
and checkpoints see θ with no extra calls, and nothing has to be undone if training stops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    Closures,
    accumulated_grads,
    clear_grads,
    micro_batches,
    split_active,
)
from .functional import sam_perturbation
from .preconditioned import HessianPower, HessianPreconditioned, group_defaults

__all__ = ["MSassha"]


class MSassha(HessianPreconditioned):
    r"""M-SASSHA: perturbation along the negative normalised momentum, Hessian at the perturbed point.

    Each ``step(closure)``:

    1. ``d = rho · m / (||m|| + perturb_eps)`` from the momentum of the previous step (global norm
       over all groups; ``d = 0`` at the first step) and ``θ̃ = θ − d``;
    2. one pass at θ̃: ``g̃ = ∇L_B(θ̃)`` (graph kept only on refresh steps); BatchNorm running
       statistics update normally (it is the only pass); the returned loss is this one, at θ̃;
    3. on refresh steps (every ``lazy_hessian`` steps from the first, and each of the first
       ``dense_refresh_steps``): Hutchinson ``ĥ`` at θ̃;
       ``v ← β2 v + (1 − β2)|ĥ|``, ``c ← (1 − β2^t)^α``;
    4. ``θ = θ̃ + d``; ``θ ← θ(1 − lr·weight_decay)``; ``m ← β1 m + (1 − β1) g̃``;
       ``θ ← θ − lr/(1 − β1^t) · m / (v^α / c + eps)``.

    Outside ``step()`` the parameters hold θ (see the module docstring), so evaluation needs
    nothing special. Under torch.distributed the gradient and the signed Hessian estimate are
    averaged across ranks as in SASSHA (``process_group``); the momentum, hence the perturbation,
    is then the same on every rank. Arguments as in :class:`~sassha_tune.optim.sassha.Sassha`; the
    defaults follow the reference M-SASSHA constructor (``rho=0.3``, ``weight_decay=1e-2``, ``hessian_power=1``,
    i.e. no square root).
    """

    def __init__(
        self,
        params,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        rho: float = 0.3,
        lazy_hessian: int = 10,
        dense_refresh_steps: int = 0,
        n_samples: int = 1,
        perturb_eps: float = 1e-12,
        eps: float = 1e-4,
        hessian_power: HessianPower = 1.0,
        bias_correction: str = "steps",
        seed: int = 0,
        max_grad_norm: float | None = None,
        always_create_graph: bool = False,
        process_group=None,
    ) -> None:
        super().__init__(params, group_defaults(locals()), seed=seed, process_group=process_group)

    def _momentum_ascent(self) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters that have a momentum, and ``d = rho m / (||m|| + perturb_eps)`` for each."""
        params, moms = [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if "exp_avg" in self.state.get(p, {})]
            params.append(ps)
            moms.append([self.state[p]["exp_avg"] for p in ps])
        ds = sam_perturbation(
            params,
            moms,
            [g["rho"] for g in self.param_groups],
            [g["perturb_eps"] for g in self.param_groups],
        )
        flat_p = [p for ps in params for p in ps]
        flat_d = [
            d.to(p.dtype) for ds_g, ps in zip(ds, params, strict=True) for d, p in zip(ds_g, ps, strict=True)
        ]
        return flat_p, flat_d

    @torch.no_grad()
    def step(self, closure: Closures | None = None) -> Tensor:  # type: ignore[override]
        """One M-SASSHA step; returns the loss of its single pass (at the perturbed point), detached."""
        closures = micro_batches(closure, type(self).__name__)
        candidates = self._candidates()
        flat = [p for ps in candidates for p in ps]
        clear_grads(flat)
        moved, ds = self._momentum_ascent()
        if moved:
            torch._foreach_sub_(moved, ds)  # theta~ = theta - d
        need_graph = self._needs_graph(candidates)
        loss, raw = accumulated_grads(closures, flat, create_graph=need_graph)
        params, grads = split_active(candidates, raw)
        del raw
        if not any(params):
            if moved:
                torch._foreach_add_(moved, ds)
            return loss.detach()
        plan = self.plan_step(params)
        estimates = self.estimate_due(params, grads, plan)
        if moved:
            torch._foreach_add_(moved, ds)  # back to theta
        del ds, moved
        self.update(params, grads, estimates, plan)
        return loss.detach()
