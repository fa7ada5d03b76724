"""What the Hessian-preconditioned optimizers share (SASSHA, M-SASSHA, AdaHessian, Sophia-H).

:class:`HessianPreconditioned` holds the lazy Hutchinson refresh schedule, the private probe
generator, the moment updates, SASSHA's preconditioned update and a complete ``state_dict``
(including the generator's state, which the official SASSHA code does not save). A step is three
public phases, which SASSHA's pass order (written once in :mod:`.sassha`) runs for one optimizer
(``Sassha.step``) or for each member of a trial pack on views of the stacked model (``Sassha.stacked_step``):

1. :meth:`HessianPreconditioned.plan_step` — count the step, decide which parameters get a new
   Hessian estimate (:class:`StepPlan`);
2. the passes and Hessian-vector products (the caller's: the optimizer runs the closure, a pack
   its batched forward), the estimate from :func:`.hessian.hutchinson_diagonals` with the
   optimizer's :meth:`~HessianPreconditioned.probe_generator`;
3. :meth:`HessianPreconditioned.update` — average across ranks, clip, and apply the update.

The math itself is in :mod:`.functional`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed import active_group, all_reduce_mean
from .base import (
    PERTURBATION_CHECKS,
    Check,
    CheckedGroups,
    Closures,
    accumulated_grads,
    check_betas,
    check_max_grad_norm,
    check_positive,
    clip_grads_,
    flag,
    integer,
    micro_batches,
    nonnegative,
    one_of,
    regroup,
    split_active,
    state_dtype,
)
from .functional import decoupled_weight_decay_, due_for_refresh, ema_, sassha_update_
from .hessian import ProbeRequest, graph_hvp, hutchinson_diagonals, make_generator

HessianPower = float | Callable[[int], float]
BIAS_CORRECTIONS = ("steps", "refreshes")  # what SASSHA's second-moment bias correction counts


def check_hessian_power(value: Any) -> None:
    """A number >= 0, or a schedule ``step -> power``."""
    if not callable(value):
        check_positive("hessian_power", value)


#: the checks of the moments' and the update's keys
MOMENT_CHECKS: dict[str, Check] = {
    "lr": nonnegative("lr"), "betas": check_betas, "weight_decay": nonnegative("weight_decay"), "eps": nonnegative("eps"),
}
#: the lazy Hutchinson refresh's
REFRESH_CHECKS: dict[str, Check] = {
    "lazy_hessian": integer("lazy_hessian"),
    "dense_refresh_steps": integer("dense_refresh_steps", minimum=0),
    "n_samples": integer("n_samples"),
}
#: the gradient's clip and the graph kept for debugging
GRADIENT_CHECKS: dict[str, Check] = {
    "max_grad_norm": check_max_grad_norm, "always_create_graph": flag("always_create_graph"),
}


#: a constructor's arguments that are not param-group keys: the run's objects and the probe seed
_NOT_GROUP_KEYS = frozenset({"self", "__class__", "params", "seed", "model", "process_group"})
_FLAGS = ("adaptive", "always_create_graph")


def group_defaults(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """A constructor's arguments (its ``locals()`` on entry) as the param-group defaults, in the
    signature's order: every hyperparameter, ``betas`` as a tuple and the flags as booleans."""
    defaults = {k: v for k, v in arguments.items() if k not in _NOT_GROUP_KEYS}
    defaults["betas"] = tuple(defaults["betas"])
    for key in _FLAGS:
        if key in defaults:
            defaults[key] = bool(defaults[key])
    return defaults


def placed_estimates(params: list[Tensor], due: list[int], estimates: list[Tensor] | None) -> list[Tensor | None]:
    """One group's Hessian estimates (of the parameters ``due`` names, or None: none this step) per
    parameter, in the state dtype; None for a parameter not refreshed."""
    placed: list[Tensor | None] = [None] * len(params)
    for i, h in zip(due, estimates or [], strict=estimates is not None):
        placed[i] = h.to(state_dtype(params[i]))
    return placed


@dataclass
class StepPlan:
    """What :meth:`HessianPreconditioned.plan_step` decided for one step, per parameter group."""

    alphas: list[float]  # the Hessian power of the step (a schedule is evaluated at this step)
    due: list[list[int]]  # indices into the group's parameters that get a new Hessian estimate
    need_graph: bool  # whether the gradient of this step must carry a graph (a refresh, or always)

    @property
    def any_due(self) -> bool:
        return any(self.due)


class HessianPreconditioned(CheckedGroups, torch.optim.Optimizer):
    """Shared machinery of the Hessian-preconditioned optimizers (not used directly).

    Per-parameter state: ``step`` (updates so far), ``hessian_step`` (steps in which the parameter
    had a gradient: it is refreshed when this is a multiple of ``lazy_hessian`` or below
    ``dense_refresh_steps``), ``hessian_refreshes``, ``exp_avg`` (m), ``exp_hessian_diag`` (v, EMA
    of |diag H| estimates) and ``bias_correction2`` (c = (1 - beta2^t)^alpha, frozen between
    refreshes). Optimizer-wide: the step count (for a scheduled ``hessian_power``), the probe
    ``seed`` and generator, the ``process_group``. Every other hyperparameter is a param-group key.
    """

    #: the checks of the family's keys (a class checks those its groups have): M-SASSHA's keys,
    #: and the others' but for their own
    GROUP_CHECKS: Mapping[str, Check] = {
        **MOMENT_CHECKS,
        **PERTURBATION_CHECKS,
        **REFRESH_CHECKS,
        "hessian_power": check_hessian_power,
        "bias_correction": one_of("bias_correction", BIAS_CORRECTIONS),
        **GRADIENT_CHECKS,
    }
    SAME_IN_EVERY_GROUP: tuple[str, ...] = ("max_grad_norm", "always_create_graph")

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, seed: int, process_group: Any) -> None:
        if isinstance(defaults.get("betas"), list):
            defaults["betas"] = tuple(defaults["betas"])
        super().__init__(params, defaults)
        self.seed = int(seed)
        self.process_group = process_group
        self._generator: torch.Generator | None = None
        self._global_step = 0

    # -- the schedule ---------------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """The number of steps taken (``hessian_power`` schedules are evaluated at it)."""
        return self._global_step

    def _alpha(self, group: Mapping[str, Any]) -> float:
        hp = group.get("hessian_power", 1.0)
        return float(hp(self._global_step)) if callable(hp) else float(hp)

    def _due(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        return due_for_refresh(self.state[p].get("hessian_step", 0), group["lazy_hessian"], group["dense_refresh_steps"])

    def _candidates(self) -> list[list[Tensor]]:
        return [[p for p in group["params"] if p.requires_grad] for group in self.param_groups]

    def _needs_graph(self, candidates: list[list[Tensor]]) -> bool:
        """Before a single pass: whether any candidate parameter is due (its gradient must carry a graph)."""
        return any(g["always_create_graph"] for g in self.param_groups) or any(
            self._due(p, group) for group, ps in zip(self.param_groups, candidates, strict=True) for p in ps
        )

    def plan_step(self, params: list[list[Tensor]]) -> StepPlan:
        """Phase 1 of a step over ``params`` (per group: the parameters that have a gradient this step).

        Counts the step (the optimizer's and each parameter's ``hessian_step``), evaluates the
        Hessian power, and decides which parameters get a new Hessian estimate."""
        self._global_step += 1
        alphas = [self._alpha(group) for group in self.param_groups]
        due = []
        for group, ps in zip(self.param_groups, params, strict=True):
            due.append([i for i, p in enumerate(ps) if self._due(p, group)])
            for p in ps:
                self._param_state(p)["hessian_step"] += 1
        always = any(g["always_create_graph"] for g in self.param_groups)
        return StepPlan(alphas, due, always or any(due))

    # -- probes -------------------------------------------------------------------------------------

    @property
    def generator(self) -> torch.Generator | None:
        """The probe generator (``None`` until the first refresh creates it)."""
        return self._generator

    def probe_generator(self, device: torch.device) -> torch.Generator:
        """The private Rademacher generator, created (seeded with ``seed``) at the first refresh on
        the device of the first refreshed parameter: a CPU generator for CPU parameters."""
        if self._generator is None:
            self._generator = make_generator(self.seed, device)
        return self._generator

    def probe_requests(self, params: list[list[Tensor]]) -> list[ProbeRequest | None]:
        """Per group: the Hutchinson request for its ``params`` (the ones due), ``None`` for a group
        with none; the group's ``n_samples`` probes from this optimizer's generator."""
        first = next((p for ps in params for p in ps), None)
        if first is None:
            return [None] * len(params)
        generator = self.probe_generator(first.device)
        return [
            ProbeRequest(ps, generator, group["n_samples"]) if ps else None
            for group, ps in zip(self.param_groups, params, strict=True)
        ]

    def hessian_estimates(self, grads: list[list[Tensor]], params: list[list[Tensor]]) -> list[list[Tensor]]:
        """Hutchinson estimates of diag(H), per group, for ``params`` from their ``grads`` (which
        carry a graph, freed after the last sample). A gradient with no graph contributes a zero
        product, but its probe is still drawn, so the stream does not shift."""
        requests = self.probe_requests(params)
        asked = [r for r, req in enumerate(requests) if req is not None]
        if not asked:
            return [[] for _ in params]
        found = hutchinson_diagonals(
            [requests[r] for r in asked],  # type: ignore[misc]
            graph_hvp([grads[r] for r in asked], [params[r] for r in asked]),
        )
        out: list[list[Tensor]] = [[] for _ in params]
        for r, est in zip(asked, found, strict=True):
            out[r] = est
        return out

    def estimate_due(
        self, params: list[list[Tensor]], grads: list[list[Tensor]], plan: StepPlan
    ) -> list[list[Tensor]] | None:
        """:meth:`hessian_estimates` for the parameters ``plan.due`` names (``None`` when none is due)."""
        if not plan.any_due:
            return None
        return self.hessian_estimates(
            [[gs[i] for i in due] for gs, due in zip(grads, plan.due, strict=True)],
            [[ps[i] for i in due] for ps, due in zip(params, plan.due, strict=True)],
        )

    # -- state ----------------------------------------------------------------------------------------

    def _param_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "exp_avg" not in state:
            dtype = state_dtype(p)
            state["step"] = 0
            state["hessian_step"] = 0
            state["hessian_refreshes"] = 0
            state["bias_correction2"] = 1.0
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_hessian_diag"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    # -- phase 3 ------------------------------------------------------------------------------------------

    def _finish_grads(
        self, params: list[Tensor], grads: list[Tensor | None], estimate: list[Tensor] | None = None
    ) -> list[Tensor]:
        """Detach the update gradients, average them across ranks (together with the signed Hessian
        ``estimate`` of this step, in the same all-reduce), clip them, expose them as ``p.grad`` and
        cast to the state dtype."""
        out = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]
        group = active_group(self.process_group)
        if group is not None:
            all_reduce_mean(out + list(estimate or []), group)
        clip_grads_(out, self.param_groups[0]["max_grad_norm"])
        for p, g in zip(params, out, strict=True):
            p.grad = g
        return [g.to(state_dtype(p)) for p, g in zip(params, out, strict=True)]

    def _decay_and_moments(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], hess: list[Tensor | None]
    ) -> tuple[list[dict[str, Any]], list[Tensor], list[bool], list[int]]:
        """What every Hessian-preconditioned update starts with: decoupled weight decay,
        ``step += 1``, ``m <- beta1 m + (1 - beta1) g`` and, for the parameters refreshed this step
        (``hess[i]`` not None), ``v <- beta2 v + (1 - beta2) hess``.

        Returns the states, the working copies of the parameters (in the state dtype; write them
        back with :meth:`_write_back`), which ones are low precision, and the refreshed indices.
        """
        beta1, beta2 = group["betas"]
        states = [self._param_state(p) for p in params]
        low = [p.dtype != state_dtype(p) for p in params]
        work = [p.detach().to(state_dtype(p)) if lo else p.detach() for p, lo in zip(params, low, strict=True)]
        decoupled_weight_decay_(work, lr=group["lr"], weight_decay=group["weight_decay"])
        for st in states:
            st["step"] += 1
        ema_([st["exp_avg"] for st in states], grads, beta=beta1)
        refreshed = [i for i, h in enumerate(hess) if h is not None]
        if refreshed:
            ema_([states[i]["exp_hessian_diag"] for i in refreshed], [hess[i] for i in refreshed], beta=beta2)  # type: ignore[misc]
            for i in refreshed:
                states[i]["hessian_refreshes"] += 1
        return states, work, low, refreshed

    @staticmethod
    def _write_back(params: list[Tensor], work: list[Tensor], low: list[bool]) -> None:
        """Copy the fp32 working copies back into half-precision parameters (others were updated in place)."""
        for p, w, lo in zip(params, work, low, strict=True):
            if lo:
                p.detach().copy_(w)

    def update(
        self,
        params: list[list[Tensor]],
        grads: list[list[Tensor | None]],
        estimates: list[list[Tensor]] | None,
        plan: StepPlan,
    ) -> None:
        """Phase 3 of a SASSHA / M-SASSHA step over ``params`` (per group, as given to :meth:`plan_step`).

        ``grads``: the gradients the update uses (SASSHA: at the perturbed point); ``estimates``:
        per group, the signed Hutchinson estimates of the parameters ``plan.due`` names (or None).
        Averages gradients and estimates across ranks, clips the gradients to ``max_grad_norm``,
        then per group: decoupled weight decay, ``m`` and (refreshed parameters) ``v <- EMA of |h|``
        with ``c <- (1 - beta2^t)^alpha``, and ``theta -= lr/(1-beta1^t) * m / (v^alpha / c + eps)``.
        """
        flat_p = [p for ps in params for p in ps]
        flat_est = [h for hs in (estimates or []) for h in hs]
        grads_c = regroup(self._finish_grads(flat_p, [g for gs in grads for g in gs], flat_est), params)
        if flat_est:
            torch._foreach_abs_(flat_est)
        for gi, (group, ps, gs) in enumerate(zip(self.param_groups, params, grads_c, strict=True)):
            hess = placed_estimates(ps, plan.due[gi], estimates[gi] if estimates else None)
            self._precondition_update(group, ps, gs, hess, plan.alphas[gi])

    def _precondition_update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], hess: list[Tensor | None], alpha: float
    ) -> None:
        if not params:
            return
        states, work, low, refreshed = self._decay_and_moments(group, params, grads, hess)
        beta1, beta2 = group["betas"]
        for i in refreshed:
            st = states[i]
            t = st["step"] if group["bias_correction"] == "steps" else st["hessian_refreshes"]
            st["bias_correction2"] = (1.0 - beta2**t) ** alpha
        sassha_update_(
            work,
            [st["exp_avg"] for st in states],
            [st["exp_hessian_diag"] for st in states],
            [st["bias_correction2"] for st in states],
            [st["step"] for st in states],
            lr=group["lr"],
            beta1=beta1,
            eps=group["eps"],
            alpha=alpha,
        )
        self._write_back(params, work, low)

    # -- checkpointing --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The usual optimizer state (every hyperparameter in ``param_groups``) plus the step count
        and the probe generator's state (a tensor)."""
        sd = super().state_dict()
        extra: dict[str, Any] = {"global_step": self._global_step}
        if self._generator is not None:
            extra["generator_state"] = self._generator.get_state().clone()
            extra["generator_device"] = str(self._generator.device)
        sd["hessian_preconditioned"] = extra
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """As ``torch.optim.Optimizer.load_state_dict``: the saved hyperparameters replace the
        current ones (a checkpoint saved with ``lazy_hessian=10`` continues with 10). Keys a saved
        group lacks (a checkpoint from before a key existed) keep the current group's value."""
        sd = dict(state_dict)
        extra = sd.pop("hessian_preconditioned", {})
        current = [dict(g) for g in self.param_groups]
        super().load_state_dict(sd)
        for group, before in zip(self.param_groups, current, strict=True):
            for key, value in before.items():
                group.setdefault(key, value)
        # torch casts floating state to the parameter's dtype: keep it fp32 for half parameters
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                for key in ("exp_avg", "exp_hessian_diag", "hessian"):
                    if key in st:
                        st[key] = st[key].to(state_dtype(p))
        self._global_step = int(extra.get("global_step", 0))
        if "generator_state" in extra:
            device = torch.device(extra["generator_device"])
            mine = next((p.device for g in self.param_groups for p in g["params"]), device)
            if mine.type == device.type:
                device = mine  # a checkpoint saved by rank 0 on cuda:0, loaded by rank r on cuda:r
            generator = torch.Generator(device=device)
            generator.set_state(extra["generator_state"].cpu())
            self._generator = generator
        else:
            self._generator = None


class OnePassPreconditioned(HessianPreconditioned):
    """A Hessian-preconditioned optimizer with one pass per step (AdaHessian, Sophia-H): the gradient
    graph is kept on refresh steps only and the Hutchinson estimate is taken from it."""

    def _one_pass(
        self, closure: Closures | None
    ) -> tuple[Tensor, list[list[Tensor]], list[list[Tensor]], list[list[Tensor | None]]]:
        """The pass, the plan and the estimate: (loss, params, update gradients, signed estimates
        per parameter or None), per group; gradients already averaged across ranks and clipped."""
        closures = micro_batches(closure, type(self).__name__)
        candidates = self._candidates()
        flat = [p for ps in candidates for p in ps]
        for p in flat:
            p.grad = None
        need_graph = self._needs_graph(candidates)
        loss, raw = accumulated_grads(closures, flat, create_graph=need_graph)
        params, grads = split_active(candidates, raw)
        del raw
        plan = self.plan_step(params)
        estimates = self.estimate_due(params, grads, plan)
        flat_est = [h for hs in (estimates or []) for h in hs]
        flat_p = [p for ps in params for p in ps]
        grads_c = regroup(self._finish_grads(flat_p, [g for gs in grads for g in gs], flat_est), params)
        hess = [placed_estimates(ps, plan.due[gi], estimates[gi] if estimates else None) for gi, ps in enumerate(params)]
        return loss.detach(), params, grads_c, hess
