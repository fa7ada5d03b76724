"""SASSHA: sharpness-aware adaptive second-order optimization with a stable (square-rooted) Hessian.

Written from a description of the official code's behaviour (``docs/optimizer.md``), not from the code
(which has no license). The default configuration reproduces the official image-classification
("IC") variant step for step, including its two undocumented details: the Hessian is evaluated at
the *hybrid point* and the bias correction counts *steps*, not Hessian refreshes. Both can be
switched to the "paper" reading (``hessian_point="perturbed"``, ``bias_correction="refreshes"``).

What SASSHA shares with M-SASSHA, AdaHessian and Sophia-H (the lazy Hutchinson refresh, the probe
generator, the preconditioned update, a complete ``state_dict``) is in :mod:`.preconditioned`;
the arithmetic is in :mod:`.functional`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import active_group, all_reduce_mean
from .base import (
    PERTURBATION_CHECKS,
    PERTURBATION_GRADS,
    Closures,
    accumulated_grads,
    check_max_grad_norm,
    clear_grads,
    flag,
    frozen_running_stats,
    micro_batches,
    one_of,
    regroup,
    second_pass_context,
    split_active,
)
from .functional import sam_perturbation
from .hessian import hutchinson_diagonals, hvp_from_grads
from .preconditioned import (
    BIAS_CORRECTIONS,
    MOMENT_CHECKS,
    REFRESH_CHECKS,
    HessianPower,
    HessianPreconditioned,
    StepPlan,
    check_hessian_power,
    group_defaults,
)
from .stack import Stack, StackMember, stacked_grads

__all__ = ["Sassha", "HESSIAN_POINTS"]

HESSIAN_POINTS = ("reference", "perturbed")  # where SASSHA takes its Hessian-vector product


class Sassha(HessianPreconditioned):
    r"""SASSHA (Shin et al., ICML 2025), official image-classification variant by default.

    Each ``step(closure)`` (see :mod:`sassha_tune.optim.base`):

    1. pass 1 at θ: ``g = ∇L_B(θ)``; the returned loss is this one, detached;
    2. perturbation ``e = rho * g / (||g|| + perturb_eps)``, ``||g||`` the global norm over all groups
       (``rho``, ``perturb_eps`` per group); ``θ ← θ + e``;
    3. pass 2 on the same batch at θ + e, with BatchNorm running statistics frozen when ``model`` is
       given; the gradient graph is kept only on Hessian-refresh steps;
    4. restore ``θ ← (θ + e) − e`` in place on ``.data`` (no autograd version bump); ``e`` is freed,
       never kept in the state;
    5. on refresh steps (every ``lazy_hessian`` steps, starting at the first, and each of the first
       ``dense_refresh_steps`` steps): Hutchinson estimate
       ``ĥ = mean_s z_s ⊙ (H z_s)`` with Rademacher probes from the optimizer's own generator;
       ``v ← β2 v + (1 − β2)|ĥ|`` and ``c ← (1 − β2^t)^α``; between refreshes v and c are frozen;
    6. ``θ ← θ (1 − lr·weight_decay)`` (decoupled), ``m ← β1 m + (1 − β1) g̃`` with g̃ the
       pass-2 gradient, ``θ ← θ − lr / (1 − β1^t) · m / (v^α / c + eps)``.

    Args:
        params: parameters or parameter groups (groups may set ``lr``, ``betas``, ``weight_decay``,
            ``rho``, ``perturb_eps``, ``eps``).
        lr: learning rate η.
        betas: (β1, β2): EMA rates of the gradient and of |diag H|.
        weight_decay: decoupled weight decay λ: every step θ is multiplied by ``1 − lr·λ`` before
            the update (all parameters, BN and biases included, as in the reference).
        rho: perturbation radius (absolute, L2 over all parameters). ``0`` still runs two passes.
        lazy_hessian: k: the Hessian estimate is refreshed at steps 1, k+1, 2k+1, ...
        dense_refresh_steps: N (default 0, the reference): also refresh at every one of the first
            N steps (a parameter is refreshed when its gradient-step count h satisfies h < N or
            h mod k = 0). Not in the paper; on models without normalization layers a small ``eps``
            with k > 1 diverges within the first steps, and N = 50 together with eps >= 1e-4
            prevents it (docs/optimizer.md).
        n_samples: Hutchinson probes per refresh.
        perturb_eps: added to the gradient norm in the perturbation.
        eps: added to the denominator *after* the power.
        hessian_power: α, a float (0.5 in every published configuration), or a callable
            ``step -> α`` (``step`` is 1-based, called once per ``step()``). As in the reference,
            the numerator uses the current α and ``c`` keeps the α of the last refresh.
        adaptive: ASAM-style perturbation ``e = rho θ² g / (|| |θ| g || + perturb_eps)``.
        hessian_point: ``"reference"`` (default): the Hessian-vector product is taken from the
            pass-2 graph *after* the in-place restore, so saved parameters read θ while saved
            activations are those of θ + e (the official code's "hybrid point").
            ``"perturbed"``: the product is taken before restoring, i.e. at θ + e (the paper's text).
        bias_correction: ``"steps"`` (default, official): ``c = (1 − β2^t)^α`` with t the step
            count at the last refresh; ``"refreshes"``: t = the number of refreshes so far (the
            statistically unbiased choice; changes the dynamics, see the reference §1.2).
        seed: seed of the private probe generator (CPU generator for CPU parameters, on the
            parameters' device otherwise: CPU and GPU runs draw different probes).
        max_grad_norm: clip the pass-2 gradient (the one the update uses) to this global L2 norm.
            ``None`` (default, as in the reference): no clipping.
        model: the module being trained, so pass 2 can freeze its BatchNorm running statistics.
            Without it pass 2 moves them (wrap the closure yourself, see ``frozen_running_stats``).
        always_create_graph: debugging: keep the pass-2 graph on every step, as the official
            training loop does (same trajectory, more memory).
        perturbation_grad: under torch.distributed data parallelism, the gradient the perturbation
            is built from: ``"local"`` (default, as the reference): each rank's own pass-1 gradient,
            so each rank perturbs differently and pass 1 costs no communication; ``"global"``: the
            pass-1 gradient averaged across ranks (one more all-reduce per step), so every rank
            perturbs like a single process on the whole batch. Ignored in a single process. With
            ``"local"`` θ is saved during the step and restored by copy (one parameter-sized
            buffer), not as (θ + e) − e, whose rounding would differ between ranks.
        process_group: the group to average over (default: the default group). Under
            torch.distributed (initialized, world size > 1) the pass-2 gradient and, on refresh
            steps, the signed Hutchinson estimate are averaged across ranks in one coalesced
            all-reduce; every rank draws the same probes (same ``seed``), so the average is
            ``z ⊙ (H̄ z)`` for the mean Hessian H̄. Run the model without DDP's hooks (plain module,
            or inside ``ddp_model.no_sync()``). See ``docs/distributed.md``.

    The state is fp32 for half-precision parameters. ``state_dict()`` also holds the step count
    and the probe generator, so a resumed run continues the exact trajectory.
    """

    GROUP_CHECKS = {
        **MOMENT_CHECKS,
        **PERTURBATION_CHECKS,
        **REFRESH_CHECKS,
        "hessian_power": check_hessian_power,
        "bias_correction": one_of("bias_correction", BIAS_CORRECTIONS),
        "hessian_point": one_of("hessian_point", HESSIAN_POINTS),
        "perturbation_grad": one_of("perturbation_grad", PERTURBATION_GRADS),
        "max_grad_norm": check_max_grad_norm,
        "adaptive": flag("adaptive"),
        "always_create_graph": flag("always_create_graph"),
    }
    SAME_IN_EVERY_GROUP = (*HessianPreconditioned.SAME_IN_EVERY_GROUP, "adaptive", "hessian_point", "perturbation_grad")

    def __init__(
        self,
        params,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        rho: float = 0.0,
        lazy_hessian: int = 10,
        dense_refresh_steps: int = 0,
        n_samples: int = 1,
        perturb_eps: float = 1e-12,
        eps: float = 1e-4,
        hessian_power: HessianPower = 0.5,
        adaptive: bool = False,
        hessian_point: str = "reference",
        bias_correction: str = "steps",
        seed: int = 0,
        max_grad_norm: float | None = None,
        model: nn.Module | None = None,
        always_create_graph: bool = False,
        perturbation_grad: str = "local",
        process_group: Any = None,
    ) -> None:
        super().__init__(params, group_defaults(locals()), seed=seed, process_group=process_group)
        self.model = model

    def perturbation(self, params: list[list[Tensor]], grads: list[list[Tensor]]) -> list[list[Tensor]]:
        """The ascent step ``e`` per group from the pass-1 ``grads`` (global norm over all groups,
        each group's ``rho`` and ``perturb_eps``), written into ``grads``."""
        groups = self.param_groups
        return sam_perturbation(
            params, grads, [g["rho"] for g in groups], [g["perturb_eps"] for g in groups],
            adaptive=groups[0]["adaptive"], inplace=True,
        )

    @torch.no_grad()
    def step(self, closure: Closures | None = None) -> Tensor:  # type: ignore[override]
        """One SASSHA step on the batch ``closure`` evaluates (or on its micro-batches); returns
        the clean (pass-1) loss. With micro-batches, a refresh step keeps every micro-batch's
        pass-2 graph until the Hessian-vector product (the product of the whole batch)."""
        closures = micro_batches(closure, type(self).__name__)
        candidates = self._candidates()
        flat = [p for ps in candidates for p in ps]
        clear_grads(flat)
        loss, first = accumulated_grads(closures, flat)  # pass 1 at theta
        params, grads1 = split_active(candidates, first)
        del first
        if not any(params):
            return loss.detach()
        share = _Share(self, params, grads1)
        del grads1

        def second_pass(need_graph: bool) -> None:  # at theta + e, on the same batch
            active = [p for ps in params for p in ps]
            _, second = accumulated_grads(
                closures, active, create_graph=need_graph, context=lambda: second_pass_context(self.model)
            )
            share.grads = regroup([torch.zeros_like(p) if g is None else g for p, g in zip(active, second, strict=True)],
                                  params)

        def estimate(shares: list[_Share], keep_graph: bool) -> None:
            share.estimates = self.estimate_due(params, share.grads, share.plan)  # type: ignore[arg-type]

        _pass_order([share], second_pass, estimate)
        return loss.detach()

    def _perturb(self, params: list[list[Tensor]], grads1: list[list[Tensor]]) -> _Displacement:
        """``theta <- theta + e`` on ``.data`` from the pass-1 gradients (averaged across ranks first
        with ``perturbation_grad="global"``); ``e`` is written over ``grads1``."""
        settings = self.param_groups[0]  # the optimizer-wide keys (the same in every group)
        group = active_group(self.process_group)
        if group is not None and settings["perturbation_grad"] == "global":
            all_reduce_mean([g for gs in grads1 for g in gs], group)
        flat_e = [e for group_e in self.perturbation(params, grads1) for e in group_e]
        data = [p.data for ps in params for p in ps]
        # Under data parallelism with local perturbations e differs between ranks, and so would the
        # rounding of (theta + e) - e: ranks would drift apart. Restore by copy there (exact).
        local = group is not None and settings["perturbation_grad"] == "local"
        saved = torch._foreach_mul(data, 1.0) if local else None
        torch._foreach_add_(data, flat_e)
        return _Displacement(data, flat_e, saved)

    # -- a trial pack's step (see .stack) ------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def stacked_step(cls, stack: Stack, members: list[StackMember]) -> tuple[Tensor, Tensor]:
        """:meth:`step` for every member of a trial pack at once: one stacked pass 1, then
        :func:`_pass_order` with each member's share of it, one stacked pass 2 and one stacked
        Hessian-vector product per probe for the members that refresh."""
        with torch.enable_grad(), stack.autocast():
            loss, out = stack.forward()
        grads1 = stacked_grads(loss, stack.params)
        shares = {m.slot: _Share(m.optimizer, [m.views], [[g[m.slot] for g in grads1]]) for m in members}
        for m in members:
            clear_grads(m.views)
        del grads1
        grads2: list[Tensor] = []

        def second_pass(need_graph: bool) -> None:
            with torch.enable_grad(), frozen_running_stats(stack.module), stack.autocast():
                loss2, _ = stack.forward()
                grads2.extend(stacked_grads(loss2, stack.params, create_graph=need_graph))
            for slot, share in shares.items():
                share.grads = [[g[slot] for g in grads2]]

        def estimate(due: list[_Share], keep_graph: bool) -> None:
            wanted = {slot: share.plan.due[0] for slot, share in shares.items() if share in due}  # type: ignore[union-attr]
            for slot, found in _stacked_estimates(stack, grads2, wanted, members, keep_graph=keep_graph).items():
                shares[slot].estimates = [found]

        _pass_order(list(shares.values()), second_pass, estimate)
        return loss.detach(), out.detach()


@dataclass(eq=False)
class _Share:
    """One optimizer's part of a step: its parameters per group (those with a gradient), their
    gradients (pass 1's, then pass 2's) and what the step decides on the way."""

    optimizer: Sassha
    params: list[list[Tensor]]
    grads: list[list[Tensor]] | None
    plan: StepPlan | None = None
    displacement: _Displacement | None = None
    estimates: list[list[Tensor]] | None = None


def _pass_order(
    shares: list[_Share], second_pass: Callable[[bool], None], estimate: Callable[[list[_Share], bool], None]
) -> None:
    """SASSHA's step after pass 1, for one optimizer (:meth:`Sassha.step`) or for the members of a
    trial pack (:meth:`Sassha.stacked_step`), who bring the passes and the Hessian-vector products.

    Each share: the step is planned and theta moved to theta + e (e from the pass-1 gradient);
    ``second_pass(need_graph)`` gives each share its pass-2 gradients; the Hessian estimates of the
    shares that refresh at the perturbed point (``estimate(shares, keep_graph)``, keeping the graph
    when estimates at the reference point follow); theta restored in place on ``.data``, so the
    graph's saved parameters now read theta while its activations are those of theta + e (the
    reference point, "hybrid" in docs/optimizer.md); the estimates at the reference point; each
    share's update."""
    for share in shares:
        share.plan = share.optimizer.plan_step(share.params)
        share.displacement = share.optimizer._perturb(share.params, share.grads)
        share.grads = None  # e was written over them
    second_pass(any(share.plan.need_graph for share in shares))
    due = [share for share in shares if share.plan.any_due]
    at = {point: [share for share in due if share.optimizer.param_groups[0]["hessian_point"] == point]
          for point in HESSIAN_POINTS}
    if at["perturbed"]:
        estimate(at["perturbed"], bool(at["reference"]))
    for share in shares:
        share.displacement.restore()
        share.displacement = None
    if at["reference"]:
        estimate(at["reference"], False)
    for share in shares:
        share.optimizer.update(share.params, share.grads, share.estimates, share.plan)


@dataclass
class _Displacement:
    """Where :meth:`Sassha._perturb` moved the parameters: their ``.data``, the ascent step ``e``,
    and a copy of theta where the restore must be by copy."""

    data: list[Tensor]
    e: list[Tensor]
    saved: list[Tensor] | None

    def restore(self) -> None:
        if self.saved is None:
            torch._foreach_sub_(self.data, self.e)
        else:
            torch._foreach_copy_(self.data, self.saved)


def _stacked_estimates(
    stack: Stack, grads2: list[Tensor], due: dict[int, list[int]], members: list[StackMember], *, keep_graph: bool
) -> dict[int, list[Tensor]]:
    """Per member (slot -> estimate over its due parameters): :func:`.hessian.hutchinson_diagonals`
    with one request per member (its own generator and ``n_samples``) and one stacked
    Hessian-vector product per sample; members not asking get zero probes."""
    if not due:
        return {}
    views = {m.slot: m for m in members}
    slots = list(due)
    requests = [views[s].optimizer.probe_requests([[views[s].views[i] for i in due[s]]])[0] for s in slots]

    def stacked_hvp(probes: list[list[Tensor] | None], keep: bool) -> list[list[Tensor] | None]:
        stacked = [torch.zeros_like(p) for p in stack.params]
        for slot, z in zip(slots, probes, strict=True):
            if z is not None:
                for i, zi in zip(due[slot], z, strict=True):
                    stacked[i][slot].copy_(zi)
        with torch.enable_grad():
            products = hvp_from_grads(grads2, stack.params, stacked, retain_graph=keep_graph or keep)
        return [None if z is None else [products[i][slot] for i in due[slot]] for slot, z in zip(slots, probes, strict=True)]

    return dict(zip(slots, hutchinson_diagonals(requests, stacked_hvp), strict=True))
