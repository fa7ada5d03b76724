"""Trial packs: K trials of one task trained together as one batched computation.

Every member of a pack is a trial with the same task (dataset, model, epochs, batch size, schedule,
precision) and its own hyperparameters and seed. The members' parameters and buffers are stacked
along a new leading dimension and the model runs once per pass as
``vmap(functional_call)`` over the members, each on its own batch. Members are independent, so

* the gradient of the *summed* member losses w.r.t. the stacked parameters holds each member's
  own gradient in its slice, and
* a Hessian-vector product of that sum with stacked probes holds each member's own H z (the
  Hessian of the sum is block diagonal).

Everything else is per member and reuses the single-trial code: each member owns a real
optimizer instance (built by :func:`sassha_tune.optim.build_optimizer`) whose parameters are
views into the member's slice of the stack, so its state, probe generator, moments, schedule and
update arithmetic are exactly those of the lone run (the same ``_foreach`` calls with the same
scalars on tensors of the same shape). The pass order of a batched step is the optimizer's own:
its ``stacked_step`` (:mod:`sassha_tune.optim.stack`), given this pack's batched forward
(:class:`StackedSteps`). With ``kernels="batched"`` only the forward/backward kernels differ
(batched vs unbatched), which is where the (float rounding) differences come from;
``kernels="exact"`` (the default for SASSHA and for optimizers without a ``stacked_step``) stacks
nothing: each member steps its own model with ``optimizer.step(closure)``, one after another (the
trainer's :class:`~sassha_tune.training.trainer.LoneSteps`), and is bitwise equal on the CPU. See
``docs/packs.md``.

A pack that runs out of memory before any member reported is split in halves and its members
restart from scratch (``train_pack(..., split_on_oom=True)``, what studies use; docs/packs.md,
"Out of memory").

``train_pack(specs, on_epoch=...) -> list[TrainResult]`` is the trainer-level entry point; a study
runs a pack of its trials in a fresh trial process (:mod:`sassha_tune.trial`, whose
:func:`~sassha_tune.trial.objective.evaluate_trials` calls ``train_pack`` for K > 1).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..devices import resolve_device
from ..errors import UserError
from ..optim import OPTIMIZERS
from ..optim.stack import Stack, StackMember
from ..plugins import is_plugin, load_plugin
from .data import Splits
from .models import build_model
from .trainer import (
    OOM_ERRORS,
    LoneSteps,
    Member,
    OutOfMemory,
    TrainResult,
    TrainSpec,
    build_members,
    build_optimizer_for,
    check_spec,
    seed_everything,
    train_members,
)

__all__ = [
    "pack_blocker",
    "train_pack",
]

#: TrainSpec fields that may differ between members (everything else must be equal)
_PER_MEMBER = frozenset({"hparams", "seed", "progress"})


# --------------------------------------------------------------------------------------------
# Normalization layers under vmap (kernels="batched" only)
#
# vmap's own rules for batch_norm / layer_norm with batched weights decompose them (normalize,
# then multiply by the weight), so the double-backward graph saves different tensors than the
# lone run's fused kernels. That changes SASSHA's "hybrid point" Hessian (the graph is read after
# theta is restored in place). These custom ops give the two layers their own vmap rules that
# call the *fused* kernels on the physical tensors, with the stacked weights as views: batch norm
# as one call over K*C channels, layer norm member by member. Autograd records the physical
# calls, so no backward needs to be written and gradients/HVPs match the lone run's semantics.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("sassha_tune::pack_batch_norm", mutates_args=("running_mean", "running_var"))
def _pack_batch_norm(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
    bias: Tensor | None, training: bool, momentum: float, eps: float,
) -> Tensor:
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps).clone()


def _front(t: Tensor | None, dim: int | None, k: int) -> Tensor | None:
    if t is None:
        return None
    if dim is None:
        return t.unsqueeze(0).expand(k, *t.shape)
    return t.movedim(dim, 0)


def _pack_batch_norm_vmap(info, in_dims, x, running_mean, running_var, weight, bias, training, momentum, eps):
    k = info.batch_size
    x = _front(x, in_dims[0], k)
    n, c = x.shape[1], x.shape[2]
    flat_x = x.transpose(0, 1).reshape(n, k * c, *x.shape[3:])
    stats = []
    for t, d in ((running_mean, in_dims[1]), (running_var, in_dims[2])):
        stats.append(None if t is None else _front(t, d, k))
    flat_stats = [None if t is None else t.reshape(k * c) for t in stats]
    w, b = _front(weight, in_dims[3], k), _front(bias, in_dims[4], k)
    out = F.batch_norm(
        flat_x, flat_stats[0], flat_stats[1], None if w is None else w.reshape(k * c),
        None if b is None else b.reshape(k * c), training, momentum, eps,
    )
    for t, flat in zip(stats, flat_stats, strict=True):  # when reshape had to copy, write back
        if t is not None and flat is not None and flat.data_ptr() != t.data_ptr():
            t.copy_(flat.view(k, c))
    return out.reshape(n, k, c, *x.shape[3:]).transpose(0, 1), 0


_pack_batch_norm.register_vmap(_pack_batch_norm_vmap)


def _batch_norm_forward(self: nn.modules.batchnorm._BatchNorm, input: Tensor) -> Tensor:
    """``_BatchNorm.forward`` with the fused op above (same bookkeeping as torch's)."""
    self._check_input_dim(input)
    eaf = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        eaf = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
    use_stats = not self.training or self.track_running_stats
    return _pack_batch_norm(
        input, self.running_mean if use_stats else None, self.running_var if use_stats else None,
        self.weight, self.bias, bn_training, eaf, self.eps,
    )


@torch.library.custom_op("sassha_tune::pack_layer_norm", mutates_args=())
def _pack_layer_norm(x: Tensor, shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return F.layer_norm(x, shape, weight, bias, eps).clone()


def _pack_layer_norm_vmap(info, in_dims, x, shape, weight, bias, eps):
    k = info.batch_size
    x, w, b = _front(x, in_dims[0], k), _front(weight, in_dims[2], k), _front(bias, in_dims[3], k)
    outs = [
        F.layer_norm(x[i], shape, None if w is None else w[i], None if b is None else b[i], eps) for i in range(k)
    ]
    return torch.stack(outs), 0


_pack_layer_norm.register_vmap(_pack_layer_norm_vmap)


def _layer_norm_forward(self: nn.LayerNorm, input: Tensor) -> Tensor:
    return _pack_layer_norm(input, list(self.normalized_shape), self.weight, self.bias, self.eps)


def _use_pack_norms(module: nn.Module) -> nn.Module:
    """Route the module's BatchNorm / LayerNorm layers through the fused-under-vmap ops."""
    import types

    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.forward = types.MethodType(_batch_norm_forward, m)  # type: ignore[method-assign]
        elif isinstance(m, nn.LayerNorm):
            m.forward = types.MethodType(_layer_norm_forward, m)  # type: ignore[method-assign]
    return module


class _Views:
    """What ``build_optimizer`` needs from a model: ``parameters()``, here views into the stack."""

    def __init__(self, views: list[Tensor]) -> None:
        self._views = views

    def parameters(self):
        return iter(self._views)

    def modules(self):  # frozen_running_stats(model) is never used on it, but keep it harmless
        return iter(())


# --------------------------------------------------------------------------------------------
# Can this run be packed?
# --------------------------------------------------------------------------------------------


def pack_blocker(model: str, model_options: dict | None = None, hparams: dict | None = None) -> str | None:
    """Why trials of this kind cannot be packed (one line), or None when they can. Every optimizer
    packs (with exact kernels where it has no batched step, see :func:`train_pack`).

    A plug-in model (``package.module:factory``) is packed only when its factory declares
    ``packable = True`` (an attribute of the factory function): the plug-in author's promise that
    the model is deterministic and stateless (no random numbers in the forward, no state kept
    between calls), which packs rely on and cannot check. A plug-in that cannot be imported here,
    or does not declare it, is not packed (docs/packs.md, "Plug-in models")."""
    if is_plugin(model):
        try:
            factory: Any = load_plugin(model, "model plug-in")
        except UserError:  # not importable here: building the model reports that, not this check
            factory = None
        if getattr(factory, "packable", False) is not True:
            return f"model {model!r} is a plug-in (packs batch the built-in models only)"
    if float((model_options or {}).get("dropout", 0.0) or 0.0) > 0:
        return "the model uses dropout (its random masks cannot follow the lone run's RNG stream)"
    hp = hparams or {}
    if callable(hp.get("hessian_power")):
        return "hessian_power is a schedule"
    if hp.get("process_group") is not None or hp.get("perturbation_grad", "local") != "local":
        return "distributed options are set"
    return None


# --------------------------------------------------------------------------------------------
# The pack trainer: the one training loop (sassha_tune.training.trainer.train_members) with a pack's stepper
# --------------------------------------------------------------------------------------------


def _check_packable(specs: Sequence[TrainSpec]) -> None:
    if not specs:
        raise ValueError("train_pack needs at least one spec")
    first = specs[0]
    for s in specs[1:]:
        for f in dataclasses.fields(TrainSpec):
            if f.name in _PER_MEMBER:
                continue
            if getattr(s, f.name) != getattr(first, f.name):
                raise ValueError(f"cannot pack: members differ in {f.name!r} (only hparams and seed may differ)")
    for s in specs:
        check_spec(s)
        blocker = pack_blocker(s.model, s.model_options, s.hparams)
        if blocker is not None:
            raise ValueError(f"cannot pack: {blocker}")


class _Pack:
    """The stacked parameters/buffers of the live members and their batched loss: one
    ``vmap(functional_call)`` of ``module`` over the members."""

    def __init__(self, module: nn.Module, members_models: list[nn.Module]) -> None:
        self.module = module
        self.param_names = [n for n, _ in module.named_parameters()]
        self.buffer_names = [n for n, _ in module.named_buffers()]
        with torch.no_grad():
            self.params = [
                torch.stack([dict(m.named_parameters())[n].detach() for m in members_models]).requires_grad_()
                for n in self.param_names
            ]
            self.buffers = [torch.stack([dict(m.named_buffers())[n] for m in members_models]) for n in self.buffer_names]

        def loss_fn(params: dict, buffers: dict, x: Tensor, y: Tensor):
            out = functional_call(module, (params, buffers), (x,))
            return F.cross_entropy(out, y), out

        self._batched = vmap(loss_fn, in_dims=(0, 0, 0, 0), randomness="error")

    def views(self, slot: int) -> list[Tensor]:
        # through .data: updating them does not bump the stacked leaves' version counters, as the
        # single-trial SASSHA restores theta on .data (the "hybrid point" of its reference default)
        return [p.data[slot] for p in self.params]

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        p = dict(zip(self.param_names, self.params, strict=True))
        b = dict(zip(self.buffer_names, self.buffers, strict=True))
        return self._batched(p, b, x, y)

    def keep(self, slots: list[int]) -> None:
        """Drop every member not in ``slots`` (new stacks; the old ones are freed)."""
        if not slots:
            self.params, self.buffers = [], []
            return
        idx = torch.tensor(slots, device=self.params[0].device)
        with torch.no_grad():
            self.params = [p.detach().index_select(0, idx).requires_grad_() for p in self.params]
            self.buffers = [b.index_select(0, idx) for b in self.buffers]

    def load_member(self, model: nn.Module, slot: int) -> nn.Module:
        with torch.no_grad():
            for (_, dst), src in zip(model.named_parameters(), self.params, strict=True):
                dst.copy_(src[slot])
            for (_, dst), src in zip(model.named_buffers(), self.buffers, strict=True):
                dst.copy_(src[slot])
        return model


class StackedSteps:
    """The stepper of a pack with batched kernels: the members' parameters and buffers stacked
    (:class:`_Pack`), each member's optimizer over views of its slice, one batched pass for all.

    Members' own models are built as a lone run builds them (their weights are what is stacked);
    the first one then serves to evaluate any member, its slice loaded in."""

    def __init__(self, device: torch.device, autocast: Callable[[], Any]) -> None:
        self.device, self.autocast = device, autocast
        self.views: dict[int, list[Tensor]] = {}  # member index -> views of its slice
        self.slots: dict[int, int] = {}

    def attach(self, members: list[Member]) -> None:
        spec0, splits0 = members[0].spec, members[0].splits
        seed_everything(spec0.seed)  # its own weights are never used (the stacks replace them)
        module = build_model(spec0.model, splits0.input_shape, splits0.num_classes, **spec0.model_options).to(self.device)
        self.pack = _Pack(_use_pack_norms(module), [m.model for m in members])
        self.eval_module = members[0].model
        for m in members:
            self.views[m.index] = self.pack.views(m.slot)
            self.slots[m.index] = m.slot
            m.attach(build_optimizer_for(m.spec, _Views(self.views[m.index])))

    def step(self, live: list[Member], xs: list[Tensor], ys: list[Tensor], weight: float) -> list[tuple[Tensor, Tensor]]:
        """One step of every live member: their optimizers' ``stacked_step`` (the method's own pass
        order, :mod:`sassha_tune.optim.stack`) around this pack's batched forward."""
        x, y = torch.stack(xs), torch.stack(ys)
        stack = Stack(self.pack.params, lambda: self.pack.forward(x, y), self.pack.module, self.autocast)
        members = [StackMember(m.optimizer, self.views[m.index], m.slot) for m in live]
        loss, out = live[0].optimizer.stacked_step(stack, members)
        return [(loss[k], out[k]) for k in range(len(live))]

    def eval_model(self, member: Member) -> nn.Module:
        return self.pack.load_member(self.eval_module, member.slot)

    def result_model(self, member: Member) -> nn.Module:
        return self.pack.load_member(copy.deepcopy(self.eval_module), member.slot)

    def release(self, live: list[Member]) -> None:
        """Keep only ``live`` in the stack and point their optimizers at views of the new one."""
        self.pack.keep([self.slots[m.index] for m in live])
        for m in live:
            new_views = self.pack.views(m.slot)
            _rebind(m.optimizer, self.views[m.index], new_views)
            self.views[m.index] = new_views
            self.slots[m.index] = m.slot


def _rebind(optimizer: torch.optim.Optimizer, old_views: list[Tensor], new_views: list[Tensor]) -> None:
    """Point an optimizer at views into a new stack, keeping its state."""
    mapping = {id(old): new for old, new in zip(old_views, new_views, strict=True)}
    for group in optimizer.param_groups:
        group["params"] = [mapping[id(p)] for p in group["params"]]
    for old, new in zip(old_views, new_views, strict=True):
        if old in optimizer.state:
            optimizer.state[new] = optimizer.state.pop(old)


def train_pack(
    specs: Sequence[TrainSpec],
    on_epoch: Sequence[Callable[[int, dict], bool] | None] | None = None,
    *,
    on_leave: Callable[[int, TrainResult], None] | None = None,
    splits: Splits | None = None,
    kernels: str | None = None,
    split_on_oom: bool = False,
    on_split: Callable[[int, list[list[int]]], None] | None = None,
    on_step: Callable[[int, int, int, list[int]], None] | None = None,
    measure: Callable[[int, Any, Splits], dict[str, Any]] | None = None,
) -> list[TrainResult]:
    """Train the members ``specs`` together; result ``i`` is what ``train(specs[i])`` would return.
    ``on_step(epoch, step, steps, members)``: after every step of the pack now training
    (``members``: its indices into ``specs``, those that left included; see ``trainer.on_step``).
    ``measure``: each member's extra epoch metrics, as for ``train`` (``trainer.measure``).

    ``on_epoch[i](epoch, metrics)`` is member i's per-epoch callback (True: stop it, "stopped").
    ``on_leave(i, result)`` is called as soon as member i is done (completed, stopped, diverged),
    so its trial can be told while the others go on. A diverged or stopped member leaves the
    pack; the survivors' computation is unchanged. Raises ValueError when the specs cannot be packed.

    ``kernels``: ``"batched"``: one ``vmap`` over the stacked members (e.g. one grouped convolution
    for all of them), the fast choice, equal to the lone run up to float rounding per step;
    ``"exact"``: each member steps its own model with the lone run's kernels and autograd graph,
    one after another (on the CPU a member reproduces the lone run bitwise, but on a GPU the pack
    only saves process start-up and data loading, not kernel launches). ``None`` (default):
    ``"exact"`` for SASSHA, whose Hessian preconditioner amplifies last-bit differences of the
    Hessian-vector products to 1e-4 .. 1e-1 within 50 steps (its registry entry's
    ``exact_packs_by_default``), for optimizers without a batched step (no ``stacked_step``:
    ``batched_packs`` False) and with gradient accumulation; ``"batched"`` for the others.

    Out of memory: by default every member still live fails with status ``"out_of_memory"``.
    ``split_on_oom=True``: a pack of K > 1 that runs out of memory before any member reported
    (no ``on_epoch`` call, no member left) is dropped and its members restart from scratch as two
    packs of ceil(K/2) and floor(K/2), one after the other, recursively; a lone member that still
    runs out fails as ``train`` does. ``on_split(epoch, halves)`` is called before the halves run
    (``epoch`` 0: while setting up the members; ``halves``: two lists of indices into ``specs``).
    Nothing was reported, so nobody is told twice, and a restarted member's result is still what
    ``train(specs[i])`` returns. Off by default so that a caller measuring a pack of K (a
    benchmark) never gets a smaller pack's numbers. An out-of-memory error after a report keeps
    the default (see docs/packs.md, "Out of memory").
    """
    specs = list(specs)
    kernels = _pack_kernels(specs, kernels)
    _check_packable(specs)
    callbacks = list(on_epoch) if on_epoch is not None else [None] * len(specs)
    if len(callbacks) != len(specs):
        raise ValueError(f"on_epoch has {len(callbacks)} callbacks for {len(specs)} specs")
    device = resolve_device(specs[0].device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if specs[0].amp == "bf16" else nullcontext
    run = _PackRun(specs, callbacks, device, autocast, kernels, splits, split_on_oom, on_leave, on_step, measure)
    results: dict[int, TrainResult] = {}
    todo = [list(range(len(specs)))]  # packs still to run, as indices into specs; depth first
    while todo:
        group = todo.pop(0)
        attempt = run.attempt(group)
        if isinstance(attempt, OutOfMemory):
            # out of the attempt's frames: its models, graphs and optimizer state are unreferenced
            # now and can be given back before the halves start
            halves = _halves(group, device)
            if on_split is not None:
                on_split(attempt.epoch, halves)
            todo[:0] = halves
            continue
        results.update(zip(group, attempt, strict=True))
    return [results[i] for i in range(len(specs))]


@dataclasses.dataclass
class _PackRun:
    """What every attempt of :func:`train_pack` shares: a pack of some of the members is trained
    by :meth:`attempt`, and the halves of one that ran out of memory by further attempts."""

    specs: list[TrainSpec]
    callbacks: list[Callable[[int, dict], bool] | None]
    device: torch.device
    autocast: Callable[[], Any]
    kernels: str
    splits: Splits | None
    split_on_oom: bool
    on_leave: Callable[[int, TrainResult], None] | None
    on_step: Callable[[int, int, int, list[int]], None] | None
    measure: Callable[[int, Any, Splits], dict[str, Any]] | None
    data: dict[int, Splits] = dataclasses.field(default_factory=dict)  # per seed, loaded once for all attempts

    def attempt(self, group: list[int]) -> list[TrainResult] | OutOfMemory:
        """Train the members ``group`` (indices into ``specs``) as one pack: their results, or
        :class:`OutOfMemory` where the pack may be split."""
        on_leave, on_step = self.on_leave, self.on_step
        sub_leave = None if on_leave is None else (lambda j, res: on_leave(group[j], res))
        may_split = self.split_on_oom and len(group) > 1
        sub_step = None if on_step is None else (lambda e, i, n: on_step(e, i, n, group))
        try:
            members = build_members([self.specs[i] for i in group], [self.callbacks[i] for i in group], self.device,
                                    splits=self.splits, data=self.data)
            stepper = LoneSteps(self.autocast) if self.kernels == "exact" else StackedSteps(self.device, self.autocast)
            attempt = train_members(members, stepper, self.device, on_leave=sub_leave, may_split=may_split,
                                    on_step=sub_step, measure=self.measure)
        except OOM_ERRORS:
            if not self.split_on_oom:
                raise  # as before: the caller fails every member
            # setting up the members ran out: nothing ran and nobody was told
            attempt = OutOfMemory(epoch=0)
        finally:
            members = stepper = None  # type: ignore[assignment]  # this attempt's models and stacks
        if isinstance(attempt, OutOfMemory) and not may_split:
            # a lone member whose model and optimizer state alone do not fit: it fails as a lone
            # trial does, and the members of the other halves still run
            (i,) = group
            attempt = [_out_of_memory(self.device, self.data.get(self.specs[i].seed))]
            if on_leave is not None:
                on_leave(i, attempt[0])
        return attempt


def _pack_kernels(specs: list[TrainSpec], kernels: str | None) -> str:
    """The kernels a pack of ``specs`` runs with (``kernels``, or the default for ``None``)."""
    batchable = bool(specs) and specs[0].accumulation == 1 and OPTIMIZERS[specs[0].optimizer].batched_packs
    if kernels is None:
        # exact for SASSHA (see train_pack), for optimizers without a batched step and for gradient
        # accumulation (only a member's own optimizer.step takes its micro-batches)
        exact = not batchable or OPTIMIZERS[specs[0].optimizer].exact_packs_by_default
        kernels = "exact" if exact else "batched"
    if kernels == "batched" and not batchable:
        raise ValueError(f"cannot pack with kernels='batched': {specs[0].optimizer} with accumulation "
                         f"{specs[0].accumulation} has no batched step (kernels='exact' runs it)")
    if kernels not in ("batched", "exact"):
        raise ValueError(f"kernels must be 'batched' or 'exact', got {kernels!r}")
    return kernels


def _out_of_memory(device: torch.device, splits: Splits | None) -> TrainResult:
    """The result of a member that ran out of memory alone (no model was built)."""
    return TrainResult("out_of_memory", "out_of_memory", 0, 0, 0.0, float("nan"), str(device), [],
                       None, splits)  # type: ignore[arg-type]  # no model was built


def _halves(group: list[int], device: torch.device) -> list[list[int]]:
    """The two halves a pack that ran out of memory restarts as, once its memory is given back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = (len(group) + 1) // 2
    return [group[:half], group[half:]]
