"""SASSHA's language-model variant, as the official GPT-2 pre-training code runs it.

Written from a description of that code's behaviour (``docs/optimizer.md``, "The language-model
variant"; the official repository has no license and none of its code is used). It differs from
the image-classification variant (:mod:`.sassha`) in every part of the step but the idea: no bias
correction of either moment, a refresh schedule on the global iteration count, a warm-up without
perturbation whose Hessian comes from the clean pass, the Hessian at the perturbed point itself
(taken after each micro-batch's backward, with fresh probes), gradient clipping of both passes,
the second pass replaying the micro-batches in reverse order, and gradients summed across ranks
(the first pass's too, before it perturbs: every rank perturbs alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import active_group, all_reduce_mean, all_reduce_sum
from .base import (
    Closure,
    Closures,
    clear_grads,
    clip_grads_,
    closure_protocol,
    double_backward_context,
    loss_of_closure,
    micro_batches,
    nonnegative,
    one_of,
    optional_count,
    regroup,
    second_pass_context,
    state_dtype,
)
from .functional import sam_perturbation, sassha_lm_update_
from .preconditioned import (
    HessianPreconditioned,
    StepPlan,
    group_defaults,
    placed_estimates,
)

__all__ = ["SasshaLM", "linear_weight_groups", "GRAD_REDUCTIONS"]

GRAD_REDUCTIONS = ("sum", "mean")  # how the ranks' gradients are combined


def linear_weight_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups with decoupled weight decay on the weights of ``nn.Linear`` layers only, as
    the official language-model code decays: biases, LayerNorm weights and embeddings (including an
    output head tied to the token embedding) get none. Returns ``[decayed, not decayed]`` (a group
    may be empty), each **sorted by parameter name** (``model.named_parameters()``, where a tied
    parameter has its first name), as the official ``configure_optimizers`` orders them: the
    Hutchinson probes are drawn in this order, so a seeded run draws the official probe stream."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    named = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda item: item[0])
    return [
        {"params": [p for _, p in named if id(p) in linear], "weight_decay": weight_decay},
        {"params": [p for _, p in named if id(p) not in linear], "weight_decay": 0.0},
    ]


class SasshaLM(HessianPreconditioned):
    r"""SASSHA, language-model variant (the official GPT-2 code's defaults).

    Each ``step(closure)`` at iteration i (0, 1, 2, ...: the reference's ``iter_num``), where
    ``closure`` is one closure or one per micro-batch (gradient accumulation; each micro-loss is
    divided by their number):

    1. pass 1 at θ over the micro-batches in order, gradients summed (detached after each
       micro-batch); the returned loss is its mean, detached;
    2. **warm-up** (i ≤ ``rho_warmup_iters``): no perturbation and no second pass; on refresh
       iterations the Hessian estimate is taken in pass 1, at θ;
    3. otherwise: the pass-1 gradient is reduced across ranks (``grad_reduce``, as step 5; under
       data parallelism), clipped to ``max_grad_norm`` (global norm), then
       ``e = rho g / (‖g‖ + perturb_eps)``, ``θ ← θ + e``: every rank perturbs by the whole
       batch's gradient, as the official loop (which syncs the gradient before clipping and
       perturbing); pass 2 replays the micro-batches in **reverse** order at θ + e (BatchNorm
       statistics frozen when ``model`` is given); on refresh iterations the estimate is taken in
       pass 2, at θ + e; ``θ ← (θ + e) − e``;
    4. refresh iterations are those with ``i mod lazy_hessian == 0`` (the first included): after
       each micro-batch's backward of the pass that estimates, a Hutchinson estimate
       ``mean_s z_s ⊙ (H_j z_s)`` with fresh Rademacher probes from the optimizer's generator;
       the estimates are summed over the micro-batches;
    5. the final gradient (pass 2's, or pass 1's during the warm-up) and the signed estimates
       summed across ranks (``grad_reduce="sum"``, the official default) or averaged (``"mean"``)
       in one all-reduce; the final gradient clipped to ``max_grad_norm``;
    6. per group: ``θ ← θ(1 − lr·weight_decay)``, ``m ← β1 m + (1 − β1) g``, on refresh
       iterations ``v ← β2 v + (1 − β2)|ĥ|``, then ``θ ← θ − lr · m / (v^α + eps)`` with
       α = ``warmup_hessian_power`` for i ≤ ``hessian_warmup_iters`` and ``hessian_power`` after.
       No bias correction of m or v.

    ``weight_decay`` is applied as given (the official scripts pass 2e-4 directly); decay only the
    weights of linear layers with :func:`linear_weight_groups` (which also sorts the parameters by
    name, as the official code, so the probes are drawn in the official order). Every parameter
    that requires a gradient takes part in every step (a parameter the loss does not reach gets a
    zero gradient).
    ``None`` for a warm-up disables it. The state (moments, step counts, probe generator) is in
    ``state_dict``, so a resumed run continues the exact trajectory.
    """

    GROUP_CHECKS = {
        **HessianPreconditioned.GROUP_CHECKS,
        "warmup_hessian_power": nonnegative("warmup_hessian_power"),
        "rho_warmup_iters": optional_count("rho_warmup_iters"),
        "hessian_warmup_iters": optional_count("hessian_warmup_iters"),
        "grad_reduce": one_of("grad_reduce", GRAD_REDUCTIONS),
    }
    SAME_IN_EVERY_GROUP = (*HessianPreconditioned.SAME_IN_EVERY_GROUP, "rho_warmup_iters", "grad_reduce")

    def __init__(
        self,
        params,
        lr: float = 0.3,
        betas: tuple[float, float] = (0.965, 0.99),
        weight_decay: float = 2e-4,
        rho: float = 0.02,
        lazy_hessian: int = 10,
        n_samples: int = 1,
        perturb_eps: float = 1e-12,
        eps: float = 1e-4,
        hessian_power: float = 0.8,
        warmup_hessian_power: float = 1.0,
        rho_warmup_iters: int | None = 2000,
        hessian_warmup_iters: int | None = 2000,
        max_grad_norm: float | None = 1.0,
        grad_reduce: str = "sum",
        seed: int = 0,
        model: nn.Module | None = None,
        process_group: Any = None,
    ) -> None:
        # always_create_graph: not an option here (the graph is kept on refresh iterations only)
        defaults = {**group_defaults(locals()), "always_create_graph": False}
        super().__init__(params, defaults, seed=seed, process_group=process_group)
        self.model = model

    # -- the schedule -------------------------------------------------------------------------------

    @property
    def iteration(self) -> int:
        """The index of the next step (0 before the first), the reference's ``iter_num``."""
        return self.global_step

    def in_rho_warmup(self, iteration: int | None = None) -> bool:
        """Whether step ``iteration`` (default: the next one) runs without perturbation."""
        i = self.iteration if iteration is None else iteration
        warm = self.param_groups[0]["rho_warmup_iters"]
        return warm is not None and i <= warm

    def plan_step(self, params: list[list[Tensor]]) -> StepPlan:
        """Count the step; refresh every parameter of the groups whose ``lazy_hessian`` divides the
        iteration; the Hessian power of the iteration."""
        i = self._global_step
        self._global_step += 1
        alphas, due = [], []
        for group, ps in zip(self.param_groups, params, strict=True):
            warm = group["hessian_warmup_iters"]
            alphas.append(float(group["warmup_hessian_power"] if warm is not None and i <= warm else group["hessian_power"]))
            due.append(list(range(len(ps))) if i % group["lazy_hessian"] == 0 else [])
            for p in ps:
                self._param_state(p)["hessian_step"] += 1
        return StepPlan(alphas, due, any(due))

    def _refreshes(self, iteration: int) -> list[bool]:
        return [iteration % group["lazy_hessian"] == 0 for group in self.param_groups]

    # -- the passes ----------------------------------------------------------------------------------

    def _pass(
        self, closures: Sequence[Closure], params: list[list[Tensor]], refresh: list[bool], *, second: bool
    ) -> tuple[Tensor, list[Tensor], list[list[Tensor]] | None]:
        """One pass over the micro-batches: (mean loss, summed gradients detached, per group the
        summed Hutchinson estimates of the refreshing groups, or None when none refreshes)."""
        flat = [p for ps in params for p in ps]
        n = len(closures)
        estimate = any(refresh)
        total = [torch.zeros_like(p) for p in flat]
        estimates: list[list[Tensor]] | None = None
        losses = []
        model = self.model if second else None  # pass 2 freezes BatchNorm running statistics
        for c in closures:
            with closure_protocol(), torch.enable_grad(), second_pass_context(model), double_backward_context(estimate):
                loss = loss_of_closure(c)
                grads = torch.autograd.grad(loss if n == 1 else loss / n, flat, create_graph=estimate, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(flat, grads, strict=True)]
            if estimate:
                estimates = _summed(estimates, self._refreshing_estimates(grads, params, refresh))
            torch._foreach_add_(total, [g.detach() for g in grads])
            del grads
            losses.append(loss.detach())
        mean_loss = losses[0] if n == 1 else torch.stack(losses).mean()
        return mean_loss, total, estimates

    def _refreshing_estimates(
        self, grads: list[Tensor], params: list[list[Tensor]], refresh: list[bool]
    ) -> list[list[Tensor]]:
        """Per group, the Hutchinson estimates from one micro-batch's (flat) ``grads`` of the groups
        that refresh (none for the others)."""
        by_group = regroup(grads, params)
        return self.hessian_estimates(
            [gs if r else [] for gs, r in zip(by_group, refresh, strict=True)],
            [ps if r else [] for ps, r in zip(params, refresh, strict=True)],
        )

    # -- the step -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closures | None = None) -> Tensor:  # type: ignore[override]
        """One iteration (see the class docstring); returns the mean pass-1 loss, detached."""
        closures = micro_batches(closure, type(self).__name__)
        params = self._candidates()
        flat = [p for ps in params for p in ps]
        clear_grads(flat)
        i = self.iteration
        refresh = self._refreshes(i)
        warm = self.in_rho_warmup(i)
        settings = self.param_groups[0]

        loss, grads, estimates = self._pass(closures, params, refresh if warm else [False] * len(params), second=False)
        plan = self.plan_step(params)
        if not warm:
            # As the official loop: the pass-1 gradient reduced across ranks (grad_reduce), then
            # clipped, then the perturbation; every rank perturbs alike, by the whole batch's gradient.
            self._reduce(grads)
            clip_grads_(grads, settings["max_grad_norm"])
            es = sam_perturbation(params, regroup(grads, params), [g["rho"] for g in self.param_groups],
                                  [g["perturb_eps"] for g in self.param_groups], inplace=True)
            flat_e = [e for group_e in es for e in group_e]
            data = [p.data for p in flat]
            torch._foreach_add_(data, flat_e)
            _, grads, estimates = self._pass(list(reversed(closures)), params, refresh, second=True)
            torch._foreach_sub_(data, flat_e)  # restore on .data (the same e on every rank: no drift)
            del es, flat_e, data
        self._update(params, grads, estimates, plan)
        return loss

    def _reduce(self, tensors: list[Tensor]) -> None:
        """Sum (``grad_reduce="sum"``) or average ``tensors`` across ranks in one coalesced
        all-reduce; nothing in a single process."""
        group = active_group(self.process_group)
        if group is not None and tensors:
            reduce = all_reduce_mean if self.param_groups[0]["grad_reduce"] == "mean" else all_reduce_sum
            reduce(tensors, group)

    def _update(
        self, params: list[list[Tensor]], grads: list[Tensor], estimates: list[list[Tensor]] | None, plan: StepPlan
    ) -> None:
        flat_p = [p for ps in params for p in ps]
        flat_est = [h for hs in (estimates or []) for h in hs]
        # the final gradient (pass 2, or pass 1 during the warm-up) and the signed estimates, reduced
        # together; then the clip of the final gradient (the official order: sync, clip, step)
        self._reduce(grads + flat_est)
        clip_grads_(grads, self.param_groups[0]["max_grad_norm"])
        for p, g in zip(flat_p, grads, strict=True):
            p.grad = g
        if flat_est:
            torch._foreach_abs_(flat_est)
        work_grads = regroup([g.to(state_dtype(p)) for p, g in zip(flat_p, grads, strict=True)], params)
        for gi, (group_, ps, gs) in enumerate(zip(self.param_groups, params, work_grads, strict=True)):
            if not ps:
                continue
            hess = placed_estimates(ps, plan.due[gi], estimates[gi] if estimates and estimates[gi] else None)
            states, work, low, _ = self._decay_and_moments(group_, ps, gs, hess)
            sassha_lm_update_(
                work,
                [st["exp_avg"] for st in states],
                [st["exp_hessian_diag"] for st in states],
                lr=group_["lr"], eps=group_["eps"], alpha=plan.alphas[gi],
            )
            self._write_back(ps, work, low)


def _summed(total: list[list[Tensor]] | None, found: list[list[Tensor]]) -> list[list[Tensor]]:
    """The micro-batches' estimates summed (``total`` None: ``found`` is the first)."""
    if total is None:
        return found
    for acc, new in zip(total, found, strict=True):
        if acc:
            torch._foreach_add_(acc, new)
    return total
