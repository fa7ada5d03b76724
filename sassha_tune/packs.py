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
scalars on tensors of the same shape). With ``kernels="batched"`` only the forward/backward
kernels differ (batched vs unbatched), which is where the (float rounding) differences come from;
``kernels="exact"`` (the default for SASSHA) runs each member's passes without vmap, as the lone
model's forward on views of its slice, and is bitwise equal on the CPU. See ``docs/packs.md``.

A pack that runs out of memory before any member reported is split in halves and its members
restart from scratch (``train_pack(..., split_on_oom=True)``, what studies use; docs/packs.md,
"Out of memory").

``train_pack(specs, on_epoch=...) -> list[TrainResult]`` is the trainer-level entry point; a study
runs a pack of its trials in a fresh trial process (:mod:`sassha_tune.trial`, whose
:func:`~sassha_tune.trial.objective.evaluate_pack` calls ``train_pack``).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .data import Splits, augment_batch, load_dataset
from .errors import UserError
from .models import build_model
from .optim import build_optimizer
from .optim.base import clear_grads, frozen_running_stats, sam_perturbation
from .optim.hessian import rademacher_probes
from .optim.peers import _OnePassStep
from .optim.sassha import Sassha, state_dtype
from .trainer import (
    _OOM_ERRORS,
    TrainResult,
    TrainSpec,
    _augment_kind,
    _check_spec,
    _sync,
    evaluate,
    lr_factor,
    resolve_device,
)

__all__ = [
    "PACKABLE_OPTIMIZERS",
    "pack_blocker",
    "choose_pack_size",
    "train_pack",
    "parse_pack",
]

#: optimizers a pack can run (SASSHA, and the first-order peers whose update is a torch optimizer's)
PACKABLE_OPTIMIZERS = frozenset({"sgd", "adamw", "sam_sgd", "sam_adamw", "sassha"})
_SAM = frozenset({"sam_sgd", "sam_adamw"})
#: TrainSpec fields that may differ between members (everything else must be equal)
_PER_MEMBER = frozenset({"hparams", "seed", "progress"})
AUTO_MAX = 16  # auto never packs more (model-steps/s saturates around K = 16 for ResNet-20, field notes §2)


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


def pack_blocker(optimizer: str, model: str, model_options: dict | None = None, hparams: dict | None = None) -> str | None:
    """Why trials of this kind cannot be packed (one line), or None when they can.

    A plug-in model (``package.module:factory``) is packed only when its factory declares
    ``packable = True`` (an attribute of the factory function): the plug-in author's promise that
    the model is deterministic and stateless (no random numbers in the forward, no state kept
    between calls), which packs rely on and cannot check. A plug-in that cannot be imported here,
    or does not declare it, is not packed (docs/packs.md, "Plug-in models")."""
    if optimizer not in PACKABLE_OPTIMIZERS:
        return f"optimizer {optimizer!r} is not packable (packable: {', '.join(sorted(PACKABLE_OPTIMIZERS))})"
    if ":" in model:
        import importlib

        module_name, _, attr = model.partition(":")
        try:
            factory: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                factory = getattr(factory, part)
        except Exception:  # not importable here: building the model reports that, not this check
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


def parse_pack(text: str | None) -> str | int:
    """``--pack``: ``auto``, or an integer >= 1."""
    if text is None:
        return "auto"
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    if t.isdigit() and int(t) >= 1:
        return int(t)
    raise UserError(f"--pack: expected auto or an integer >= 1, got {text!r}")


def _free_cuda_bytes(device: str) -> int | None:
    """Free memory of the CUDA device, asked in a child process (the coordinator keeps no CUDA context)."""
    code = (
        "import sys, torch\n"
        "d = torch.device(sys.argv[1] if sys.argv[1] != 'auto' else 'cuda')\n"
        "print(torch.cuda.mem_get_info(d)[0] if torch.cuda.is_available() else -1)\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code, device], capture_output=True, text=True, timeout=120)
        value = int(out.stdout.strip().splitlines()[-1])
    except Exception:
        return None
    return value if value >= 0 else None


def _member_bytes(cfg: Any) -> int:
    """A deliberately generous estimate of one member's GPU memory: parameter-sized tensors
    (params, two gradients, optimizer state, probes, double-backward graph: ~12 copies) plus
    saved activations (~600 floats per input element per example, 2 bytes with bf16)."""
    from .data import load_dataset as _ld  # noqa: F401  (shape comes from the config below)

    shape = tuple(int(s) for s in (cfg.task.dataset_options.get("shape") or ()))
    known = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "fashion_mnist": (1, 28, 28), "mnist1d": (1, 40),
             "digits": (1, 8, 8)}
    shape = shape or known.get(cfg.task.dataset, (3, 32, 32))
    try:
        model = build_model(cfg.task.model, shape, 100, **dict(cfg.task.model_options))
        n_params = sum(p.numel() for p in model.parameters())
    except Exception:
        n_params = 10_000_000
    elem = 2 if cfg.device.amp == "bf16" else 4
    return 12 * 4 * n_params + cfg.task.batch_size * math.prod(shape) * 600 * elem


def choose_pack_size(cfg: Any, requested: str | int, *, device: str | None, budget_left: int) -> tuple[int, str]:
    """(pack size, one line saying why) for a study's config and ``--pack``."""
    from .spaces import to_hparams

    try:
        hp = to_hparams(cfg.optimizer.name, dict(cfg.optimizer.fixed), seed=cfg.seed)
    except Exception:
        hp = dict(cfg.optimizer.fixed)
    if requested == 1:
        return 1, "one trial at a time (--pack 1)"
    blocker = pack_blocker(cfg.optimizer.name, cfg.task.model, dict(cfg.task.model_options), hp)
    if blocker is not None:
        return 1, f"one trial at a time: cannot pack ({blocker})"
    if isinstance(requested, int):
        return requested, f"packs of {requested} trials per process (--pack {requested})"
    dev = (device or cfg.device.name or "auto").lower()
    if dev == "cpu" or (dev == "auto" and not torch.cuda.is_available()):
        return 1, "one trial at a time (--pack auto on the CPU: a small model already uses the cores)"
    free = _free_cuda_bytes(dev)
    if free is None:
        return 1, "one trial at a time (--pack auto: could not read the GPU's free memory)"
    per = _member_bytes(cfg)
    k = max(1, min(AUTO_MAX, int(0.6 * free) // max(per, 1)))
    why = f"--pack auto: {free / 2**30:.1f} GiB free, ~{per / 2**30:.2f} GiB per member, at most {AUTO_MAX}"
    if k == 1:
        return 1, f"one trial at a time ({why})"
    return k, f"packs of up to {k} trials per process ({why})"


# --------------------------------------------------------------------------------------------
# The pack trainer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Member:
    index: int
    spec: TrainSpec
    splits: Splits
    optimizer: torch.optim.Optimizer
    views: list[Tensor]  # one per parameter: a view (through .data) of this member's slice
    base_lrs: list[float]
    perm_gen: torch.Generator
    aug_gen: torch.Generator
    on_epoch: Callable[[int, dict], bool] | None
    slot: int = 0  # position in the current stack
    history: list[dict] = dataclasses.field(default_factory=list)
    steps: int = 0
    loss_sum: Tensor | None = None
    correct: Tensor | None = None
    seen: int = 0
    perm: Tensor | None = None


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
        _check_spec(s)
        blocker = pack_blocker(s.optimizer, s.model, s.model_options, s.hparams)
        if blocker is not None:
            raise ValueError(f"cannot pack: {blocker}")


class _Pack:
    """The stacked parameters/buffers of the live members and the batched loss.

    ``exact=True`` (``kernels="exact"``): no vmap; each member's pass is the lone model's forward
    (``functional_call``) on views of its slice, so its autograd graph is the lone run's node for
    node, plus one ``select`` per parameter. That matters for SASSHA: where an activation feeds
    several ops (a residual connection), the double backward sums three or more contributions into
    its gradient in the order the engine runs the producing nodes, and under vmap that order is not
    the lone run's: HVPs then differ in the last bits (~1e-7), which SASSHA's ``|z * Hz|``
    preconditioner amplifies to 1e-6 .. 1e-4 after one step on a BatchNorm ResNet.
    """

    def __init__(self, module: nn.Module, members_models: list[nn.Module], *, exact: bool = False,
                 channels_last: bool = False) -> None:
        self.module = module
        self.exact = exact
        self.channels_last = channels_last
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
        if self.exact:
            losses, outs = [], []
            for i in range(len(x)):
                xi = x[i].contiguous(memory_format=torch.channels_last) if self.channels_last else x[i]
                p = {n: t[i] for n, t in zip(self.param_names, self.params, strict=True)}
                b = {n: t[i] for n, t in zip(self.buffer_names, self.buffers, strict=True)}
                out = functional_call(self.module, (p, b), (xi,))
                losses.append(F.cross_entropy(out, y[i]))
                outs.append(out)
            return torch.stack(losses), torch.stack(outs)
        p = dict(zip(self.param_names, self.params, strict=True))
        b = dict(zip(self.buffer_names, self.buffers, strict=True))
        return self._batched(p, b, x, y)

    def keep(self, slots: list[int]) -> None:
        """Drop every member not in ``slots`` (new stacks; the old ones are freed)."""
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


def _rebind(member: _Member, new_views: list[Tensor]) -> None:
    """Point the member's optimizer at views into the new stack, keeping its state."""
    opt = member.optimizer
    mapping = {id(old): new for old, new in zip(member.views, new_views, strict=True)}
    for group in opt.param_groups:
        group["params"] = [mapping[id(p)] for p in group["params"]]
    for old, new in zip(member.views, new_views, strict=True):
        if old in opt.state:
            opt.state[new] = opt.state.pop(old)
    member.views = new_views


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def train_pack(
    specs: Sequence[TrainSpec],
    on_epoch: Sequence[Callable[[int, dict], bool] | None] | None = None,
    *,
    on_leave: Callable[[int, TrainResult], None] | None = None,
    splits: Splits | None = None,
    kernels: str | None = None,
    split_on_oom: bool = False,
    on_split: Callable[[int, list[list[int]]], None] | None = None,
) -> list[TrainResult]:
    """Train the members ``specs`` together; result ``i`` is what ``train(specs[i])`` would return.

    ``on_epoch[i](epoch, metrics)`` is member i's per-epoch callback (True: stop it, "stopped").
    ``on_leave(i, result)`` is called as soon as member i is done (completed, stopped, diverged),
    so its trial can be told while the others go on. A diverged or stopped member leaves the
    stack; the survivors' computation is unchanged. Raises ValueError when the specs cannot be packed.

    ``kernels``: ``"batched"``: one ``vmap`` over the members (e.g. one grouped convolution for
    all of them), the fast choice, equal to the lone run up to float rounding per step;
    ``"exact"``: each member's passes run as the lone model's forward on views of its slice (the
    lone run's kernels and autograd graph): on the CPU a member reproduces the lone run bitwise,
    but on a GPU the pack only saves process start-up, not kernel launches. ``None`` (default):
    ``"exact"`` for SASSHA, whose Hessian preconditioner amplifies last-bit differences of the
    Hessian-vector products to 1e-4 .. 1e-1 within 50 steps, ``"batched"`` for the others.

    Out of memory: by default every member still live fails with status ``"out_of_memory"``.
    ``split_on_oom=True``: a pack of K > 1 that runs out of memory before any member reported
    (no ``on_epoch`` call, no member left) is dropped and its members restart from scratch as two
    packs of ceil(K/2) and floor(K/2), one after the other, recursively; a lone member that still
    runs out fails as ``train`` does. ``on_split(epoch, halves)`` is called before the halves run
    (``epoch`` 0: while stacking the members; ``halves``: two lists of indices into ``specs``).
    Nothing was reported, so nobody is told twice, and a restarted member's result is still what
    ``train(specs[i])`` returns. Off by default so that a caller measuring a pack of K (a
    benchmark) never gets a smaller pack's numbers. An out-of-memory error after a report keeps
    the default (see docs/packs.md, "Out of memory").
    """
    specs = list(specs)
    if kernels is None:
        kernels = "exact" if specs and specs[0].optimizer == "sassha" else "batched"
    if kernels not in ("batched", "exact"):
        raise ValueError(f"kernels must be 'batched' or 'exact', got {kernels!r}")
    _check_packable(specs)
    callbacks = list(on_epoch) if on_epoch is not None else [None] * len(specs)
    if len(callbacks) != len(specs):
        raise ValueError(f"on_epoch has {len(callbacks)} callbacks for {len(specs)} specs")
    device = resolve_device(specs[0].device)
    results: dict[int, TrainResult] = {}
    data: dict[int, Splits] = {}  # per seed, loaded once for all attempts
    todo = [list(range(len(specs)))]  # packs still to run, as indices into specs; depth first
    while todo:
        group = todo.pop(0)
        sub_leave = None if on_leave is None else (lambda j, res, group=group: on_leave(group[j], res))
        may_split = split_on_oom and len(group) > 1
        try:
            attempt = _train_once(
                [specs[i] for i in group], [callbacks[i] for i in group], on_leave=sub_leave, splits=splits,
                kernels=kernels, data=data, may_split=may_split, device=device,
            )
        except _OOM_ERRORS:
            if not split_on_oom:
                raise  # as before: the caller fails every member
            # stacking the members ran out: nothing ran and nobody was told
            attempt = _OutOfMemory(epoch=0)
        if isinstance(attempt, _OutOfMemory) and not may_split:
            # a lone member whose model and optimizer state alone do not fit: it fails as a lone
            # trial does, and the members of the other halves still run
            (i,) = group
            attempt = [TrainResult("out_of_memory", "out_of_memory", 0, 0, 0.0, float("nan"), str(device), [],
                                   None, data.get(specs[i].seed))]  # type: ignore[arg-type]  # no model was built
            if on_leave is not None:
                on_leave(i, attempt[0])
        if isinstance(attempt, _OutOfMemory):
            # out of the except clause and of the attempt's frames: its stacks, graphs and
            # optimizer state are unreferenced now and can be given back before the halves start
            epoch = attempt.epoch
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            half = (len(group) + 1) // 2
            halves = [group[:half], group[half:]]
            if on_split is not None:
                on_split(epoch, halves)
            todo[:0] = halves
            continue
        results.update(zip(group, attempt, strict=True))
    return [results[i] for i in range(len(specs))]


@dataclasses.dataclass
class _OutOfMemory:
    """What an attempt returns when it ran out of memory before any member reported: it may be split."""

    epoch: int  # 0: while stacking the members, before the first epoch


def _train_once(
    specs: list[TrainSpec],
    callbacks: list[Callable[[int, dict], bool] | None],
    *,
    on_leave: Callable[[int, TrainResult], None] | None,
    splits: Splits | None,
    kernels: str,
    data: dict[int, Splits],
    may_split: bool,
    device: torch.device,
) -> list[TrainResult] | _OutOfMemory:
    """One pack of ``specs`` (see :func:`train_pack`; indices are positions in ``specs``).

    Out of memory in the epochs: :class:`_OutOfMemory` when ``may_split`` and no member reported
    yet, else every live member fails ``out_of_memory``. While stacking: the error propagates."""
    spec0 = specs[0]

    # data and init exactly as the lone trainer makes them, per member seed (the data is read-only,
    # so a retried half reuses what an earlier attempt loaded; fresh_model re-seeds before init)
    for s in specs:
        if s.seed not in data:
            _seed_all(s.seed)
            data[s.seed] = (
                load_dataset(
                    s.dataset, s.data_dir, val_fraction=s.val_fraction, label_noise=s.label_noise, seed=s.seed,
                    device=device, options=s.dataset_options,
                )
                if splits is None
                else splits.to(device)
            )
    by_seed = {s.seed: data[s.seed] for s in specs}
    ref_splits = by_seed[spec0.seed]
    aug = _augment_kind(spec0, ref_splits)
    channels_last = spec0.channels_last and len(ref_splits.input_shape) == 3

    def fresh_model(seed: int) -> nn.Module:
        if seed is not None:
            _seed_all(seed)
            torch.manual_seed(seed)
        m = build_model(spec0.model, ref_splits.input_shape, ref_splits.num_classes, **spec0.model_options).to(device)
        return m.to(memory_format=torch.channels_last) if channels_last else m

    models = [fresh_model(s.seed) for s in specs]
    pack_module = fresh_model(spec0.seed)
    if kernels == "batched":
        _use_pack_norms(pack_module)
    pack = _Pack(pack_module, models, exact=kernels == "exact", channels_last=channels_last)
    eval_model = models[0]
    del models

    members: list[_Member] = []
    for i, s in enumerate(specs):
        views = pack.views(i)
        hparams = dict(s.hparams)
        if s.grad_clip is not None:
            hparams["max_grad_norm"] = s.grad_clip
        try:
            opt = build_optimizer(s.optimizer, _Views(views), hparams)  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            raise UserError(f"optimizer {s.optimizer!r}: {exc}") from None
        base_lrs = []
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            base_lrs.append(group["initial_lr"])
        members.append(
            _Member(
                index=i, spec=s, splits=by_seed[s.seed], optimizer=opt, views=views, base_lrs=base_lrs,
                perm_gen=torch.Generator(device=device).manual_seed(s.seed),
                aug_gen=torch.Generator(device=device).manual_seed(s.seed + 1),
                on_epoch=callbacks[i], slot=i,
            )
        )

    n_train = len(ref_splits.y_train)
    steps_per_epoch = n_train // spec0.batch_size + (1 if n_train % spec0.batch_size > 1 else 0)
    if spec0.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, spec0.max_steps_per_epoch)
    total_steps = max(spec0.epochs * steps_per_epoch, 1)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if spec0.amp == "bf16" else nullcontext
    kind = spec0.optimizer
    cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    results: dict[int, TrainResult] = {}
    live = list(members)
    step = 0
    step_seconds = 0.0
    t_start = time.perf_counter()
    epoch = 0
    reported = False  # a member called its on_epoch or left: from then on the pack cannot be split
    split = False

    def leave(m: _Member, status: str, failure: str | None) -> None:
        nonlocal reported
        reported = True
        model = pack.load_member(copy.deepcopy(eval_model), m.slot)
        res = TrainResult(
            status=status, failure_reason=failure, epochs_completed=len(m.history), steps=m.steps,
            train_seconds=time.perf_counter() - t_start,
            ms_per_step=1000.0 * step_seconds / step if step else float("nan"),
            device=str(device), history=m.history, model=model, splits=m.splits, optimizer=None,
        )
        if on_leave is not None:
            on_leave(m.index, res)
        # only once told: a member whose on_leave ran out of memory (e.g. its final sharpness
        # metrics) is failed out_of_memory below, as it would be alone, not left untold
        results[m.index] = res

    def fail_out_of_memory(m: _Member) -> None:
        """Free what can be freed, then fail ``m`` as a lone run that ran out of memory fails."""
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        res = TrainResult("out_of_memory", "out_of_memory", len(m.history), m.steps,
                          time.perf_counter() - t_start, float("nan"), str(device), m.history,
                          eval_model, m.splits, None)
        results[m.index] = res
        if on_leave is not None:
            on_leave(m.index, res)

    def compact(gone: list[_Member]) -> None:
        nonlocal live
        if not gone:
            return
        ids = {id(m) for m in gone}
        live = [m for m in live if id(m) not in ids]
        if not live:
            return
        pack.keep([m.slot for m in live])
        for slot, m in enumerate(live):
            m.slot = slot
            _rebind(m, pack.views(slot))

    try:
        for epoch in range(1, spec0.epochs + 1):
            if not live:
                break
            t_epoch = time.perf_counter()
            _sync(device)
            t_steps = time.perf_counter()
            for m in live:
                m.perm = torch.randperm(n_train, generator=m.perm_gen, device=device)
                m.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                m.correct = torch.zeros((), dtype=torch.long, device=device)
                m.seen = 0
            for i in range(steps_per_epoch):
                xs, ys = [], []
                for m in live:
                    idx = m.perm[i * spec0.batch_size : (i + 1) * spec0.batch_size]  # type: ignore[index]
                    xb, yb = m.splits.x_train[idx], m.splits.y_train[idx]
                    if aug:
                        xb = augment_batch(xb, aug, m.aug_gen)
                    xs.append(xb)
                    ys.append(yb)
                    factor = lr_factor(m.spec, step, total_steps)
                    for group, base in zip(m.optimizer.param_groups, m.base_lrs, strict=True):
                        group["lr"] = base * factor
                x, y = torch.stack(xs), torch.stack(ys)
                del xs
                if kind == "sassha":
                    loss, out = _sassha_step(pack, live, x, y, autocast)
                elif kind in _SAM:
                    loss, out = _sam_step(pack, live, x, y, autocast)
                else:
                    loss, out = _one_pass_step(pack, live, x, y, autocast)
                step += 1
                check = i % 10 == 9 or i == steps_per_epoch - 1
                diverged = []
                for m in live:
                    k = m.slot
                    m.steps += 1
                    m.seen += len(ys[k])
                    m.loss_sum += loss[k].double() * len(ys[k])  # type: ignore[operator]
                    m.correct += (out[k].argmax(1) == ys[k]).sum()  # type: ignore[operator]
                    if check and not torch.isfinite(m.loss_sum):  # type: ignore[arg-type]
                        diverged.append(m)
                del loss, out, x, y, ys
                for m in diverged:
                    leave(m, "diverged", "diverged")
                compact(diverged)
                if not live:
                    break
            _sync(device)
            step_seconds += time.perf_counter() - t_steps
            gone = []
            for m in list(live):
                model = pack.load_member(eval_model, m.slot)
                val_loss, val_acc = evaluate(model, m.splits.x_val, m.splits.y_val, batch_size=spec0.eval_batch_size)
                metrics = {
                    "epoch": epoch,
                    "train_loss": float(m.loss_sum) / max(m.seen, 1),  # type: ignore[arg-type]
                    "train_acc": int(m.correct) / max(m.seen, 1),  # type: ignore[arg-type]
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "lr": m.optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - t_epoch,
                }
                if len(m.splits.y_val) and not math.isfinite(val_loss):
                    leave(m, "diverged", "diverged")
                    gone.append(m)
                    continue
                m.history.append(metrics)
                if m.on_epoch is None:
                    continue
                reported = True
                if m.on_epoch(epoch, dict(metrics)):
                    leave(m, "stopped", None)
                    gone.append(m)
            compact(gone)
        for m in live:
            try:
                leave(m, "completed", None)
            except _OOM_ERRORS:
                # this member's final metrics (sharpness: Hessian-vector products) ran out of
                # memory: it fails as it would alone, and every other finished member still gets
                # its own attempt at its metrics, as it would alone
                fail_out_of_memory(m)
    except _OOM_ERRORS:
        pack.params = pack.buffers = []  # type: ignore[assignment]
        for m in members:
            m.optimizer.state.clear()
        # Nobody was told anything yet: train_pack may restart the members in smaller packs (and
        # frees the rest of this attempt once its frames are gone). After a report it may not
        # (docs/packs.md, "Out of memory"): the live members fail as out_of_memory.
        split = may_split and not reported
        if not split:
            for m in members:
                if m.index not in results:
                    fail_out_of_memory(m)
    finally:
        if device.type == "cuda":
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags
    if split:
        return _OutOfMemory(epoch)
    return [results[i] for i in range(len(specs))]


# --------------------------------------------------------------------------------------------
# One step of each method on the stack; per-member arithmetic through the member's optimizer
# --------------------------------------------------------------------------------------------


def _grads(loss: Tensor, pack: _Pack, *, create_graph: bool = False) -> list[Tensor]:
    with torch.enable_grad():
        total = loss.sum()
    raw = torch.autograd.grad(total, pack.params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(pack.params, raw, strict=True)]


@torch.no_grad()
def _one_pass_step(pack: _Pack, live: list[_Member], x: Tensor, y: Tensor, autocast) -> tuple[Tensor, Tensor]:
    """SGD / AdamW: one pass; each member's torch update on its slice (``_OnePassStep``)."""
    with torch.enable_grad(), autocast():
        loss, out = pack.forward(x, y)
    grads = _grads(loss, pack)
    for m in live:
        clear_grads(m.views)
        for v, g in zip(m.views, grads, strict=True):
            v.grad = g[m.slot]
        m.optimizer._clip()  # type: ignore[attr-defined]
        super(_OnePassStep, m.optimizer).step()  # type: ignore[misc]
    return loss.detach(), out.detach()


@torch.no_grad()
def _sam_step(pack: _Pack, live: list[_Member], x: Tensor, y: Tensor, autocast) -> tuple[Tensor, Tensor]:
    """SAM-SGD / SAM-AdamW as ``peers._SAMStep.step``: perturb, pass 2 (BN frozen), copy theta back, base update."""
    with torch.enable_grad(), autocast():
        loss, out = pack.forward(x, y)
    grads1 = _grads(loss, pack)
    saved = []
    for m in live:
        groups = m.optimizer.param_groups
        g = groups[0]
        es = sam_perturbation(
            [m.views], [[gr[m.slot] for gr in grads1]], [g["rho"]], [g["perturb_eps"]],
            adaptive=bool(g["adaptive"]), inplace=True,
        )
        saved.append(torch._foreach_mul(m.views, 1.0))
        torch._foreach_add_(m.views, es[0])
    del grads1
    with torch.enable_grad(), frozen_running_stats(pack.module), autocast():
        loss2, _ = pack.forward(x, y)
    grads2 = _grads(loss2, pack)
    del loss2
    for m, theta in zip(live, saved, strict=True):
        torch._foreach_copy_(m.views, theta)
        for v, g in zip(m.views, grads2, strict=True):
            v.grad = g[m.slot]
        m.optimizer._clip()  # type: ignore[attr-defined]
        super(_OnePassStep, m.optimizer).step()  # type: ignore[misc]
    return loss.detach(), out.detach()


def _hutchinson(
    pack: _Pack, grads2: list[Tensor], due: dict[int, list[int]], live: list[_Member], *, keep_graph: bool
) -> dict[int, list[Tensor]]:
    """Per member (slot -> estimate over its due parameters): ``HessianPreconditioned.hessian_diagonal``
    with one stacked Hessian-vector product per sample; members not in ``due`` get zero probes."""
    by_slot = {m.slot: m for m in live}
    estimates: dict[int, list[Tensor]] = {}
    if not due:
        return estimates
    n_max = max(by_slot[s].optimizer.n_samples for s in due)  # type: ignore[attr-defined]
    for slot, idx in due.items():
        estimates[slot] = [torch.zeros_like(by_slot[slot].views[i]) for i in idx]
    for s in range(n_max):
        stacked = [torch.zeros_like(p) for p in pack.params]
        drawn: dict[int, list[Tensor]] = {}
        for slot, idx in due.items():
            opt = by_slot[slot].optimizer
            if s >= opt.n_samples:  # type: ignore[attr-defined]
                continue
            views = [by_slot[slot].views[i] for i in idx]
            probes = rademacher_probes(views, opt.probe_generator(views[0].device))  # type: ignore[attr-defined]
            for i, z in zip(idx, probes, strict=True):
                stacked[i][slot].copy_(z)
            drawn[slot] = probes
        products = torch.autograd.grad(
            grads2, pack.params, grad_outputs=stacked, retain_graph=keep_graph or s < n_max - 1, allow_unused=True
        )
        products = [torch.zeros_like(p) if h is None else h for p, h in zip(pack.params, products, strict=True)]
        for slot, probes in drawn.items():
            n = by_slot[slot].optimizer.n_samples  # type: ignore[attr-defined]
            torch._foreach_addcmul_(estimates[slot], probes, [products[i][slot] for i in due[slot]], value=1.0 / n)
    return estimates


@torch.no_grad()
def _sassha_step(pack: _Pack, live: list[_Member], x: Tensor, y: Tensor, autocast) -> tuple[Tensor, Tensor]:
    """``Sassha.step`` for every member at once (same order of operations per member)."""
    with torch.enable_grad(), autocast():
        loss, out = pack.forward(x, y)
    grads1 = _grads(loss, pack)
    need_graph = False
    alphas, refresh, flat_es = {}, {}, {}
    for m in live:
        opt: Sassha = m.optimizer  # type: ignore[assignment]
        clear_grads(m.views)
        opt._global_step += 1
        alphas[m.slot] = opt._alpha()
        refresh[m.slot] = [opt._due_for_refresh(p) for p in m.views]
        for p in m.views:
            opt._param_state(p)["hessian_step"] += 1
        need_graph = need_graph or opt.always_create_graph or any(refresh[m.slot])
        g = opt.param_groups
        es = sam_perturbation(
            [m.views], [[gr[m.slot] for gr in grads1]], [gr["rho"] for gr in g], [gr["perturb_eps"] for gr in g],
            adaptive=opt.adaptive, inplace=True,
        )
        flat_es[m.slot] = es[0]
        torch._foreach_add_(m.views, es[0])
    del grads1
    with torch.enable_grad(), frozen_running_stats(pack.module), autocast():
        loss2, _ = pack.forward(x, y)
        grads2 = _grads(loss2, pack, create_graph=need_graph)
    del loss2
    due = {m.slot: [i for i, r in enumerate(refresh[m.slot]) if r] for m in live}
    due = {s: idx for s, idx in due.items() if idx}
    point = {m.slot: m.optimizer.hessian_point for m in live}  # type: ignore[attr-defined]
    due_perturbed = {s: i for s, i in due.items() if point[s] == "perturbed"}
    due_reference = {s: i for s, i in due.items() if point[s] == "reference"}
    estimates: dict[int, list[Tensor]] = {}
    if due_perturbed:
        with torch.enable_grad():
            estimates.update(_hutchinson(pack, grads2, due_perturbed, live, keep_graph=bool(due_reference)))
    for m in live:  # restore on .data: the graph's saved parameters now read theta
        torch._foreach_sub_(m.views, flat_es[m.slot])
    del flat_es
    if due_reference:
        with torch.enable_grad():
            estimates.update(_hutchinson(pack, grads2, due_reference, live, keep_graph=False))
    for m in live:
        opt = m.optimizer  # type: ignore[assignment]
        grads = opt._finish_grads(m.views, [g[m.slot] for g in grads2], opt.max_grad_norm)
        hess: list[Tensor | None] = [None] * len(m.views)
        est = estimates.get(m.slot)
        if est:
            torch._foreach_abs_(est)
            for i, h in zip(due[m.slot], est, strict=True):
                hess[i] = h.to(state_dtype(m.views[i]))
        opt._precondition_update(opt.param_groups[0], m.views, grads, hess, alphas[m.slot])
    del grads2
    return loss.detach(), out.detach()
