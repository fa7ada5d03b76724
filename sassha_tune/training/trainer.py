"""The one training loop: ``train(TrainSpec) -> TrainResult`` for a trial, :func:`train_members`
for K >= 1 trials at once (a trial pack, :mod:`sassha_tune.training.packs`).

The data live on the device as tensors; batches come from each member's seeded permutation and are
augmented on the device. A *stepper* takes the optimizer steps: :class:`LoneSteps` runs
``loss = optimizer.step(closure)`` on each member's own model (see :mod:`sassha_tune.optim.base`),
whatever the optimizer, so the loop never branches on its name; a pack with batched kernels
supplies its own stepper (:class:`~sassha_tune.training.packs.StackedSteps`: stacked parameters,
one batched forward for all members, the pass order the members' optimizer's ``stacked_step``,
:mod:`sassha_tune.optim.stack`). Everything
else exists once, here: seeding, data, models, optimizers, the learning-rate schedule (every
parameter group gets its initial lr times the schedule factor before each step), the epoch's
metrics, the divergence check, validation, ``on_epoch`` and out-of-memory handling.

Epochs are numbered from 1: ``history[i]["epoch"] == i + 1`` and ``on_epoch(epoch, metrics)`` is
called with that number after the epoch's validation; returning True stops the run ("stopped").
``measure(epoch, model, splits)``, if given, runs after each epoch's validation (on rank 0) and
returns extra metrics for that epoch (sharpness during training, e.g.); they join the epoch's
metrics, its history entry and what ``on_epoch`` is told. It must leave the model as it found it.
``on_step(epoch, step, steps)``, if given, is called after every optimizer step (``step`` of the
epoch's ``steps``, from 1; on rank 0 only): progress within a long epoch, for a live view. It must
be cheap (the trial process throttles what it sends).
"""

from __future__ import annotations

import gc
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..devices import onednn_workaround, resolve_device
from ..devices import synchronize as _sync
from ..distributed import Ranks, all_reduce_mean, any_true, broadcast_module, broadcast_object, setup
from ..errors import UserError
from ..metrics.evaluation import cross_entropy, evaluate, perplexity
from ..optim import build_optimizer, hessian
from .data import Splits, augment_batch, load_dataset, token_windows
from .models import build_model

SCHEDULES = ("constant", "multistep", "cosine")
#: what an allocator raises when a device runs out of memory (a result, never a crash)
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)} - {None}
)


@dataclass(kw_only=True)
class TrainSpec:
    """What one member trains. Every setting the study config owns is required: a trial's spec
    comes from :func:`sassha_tune.trial.objective.build_spec`, which fills each from the validated
    config, so the config's dataclasses (``config/schema.py``) are the one place their defaults are
    declared; a spec built anywhere else says what it trains. Only ``progress`` has a default: it
    is not a config setting but how the caller shows progress."""

    dataset: str
    data_dir: str | None
    dataset_options: dict
    model: str
    model_options: dict
    epochs: int
    batch_size: int
    augment: bool | None  # None: the dataset's default; True: that default (or "crop" for images)
    label_noise: float
    val_fraction: float
    optimizer: str
    hparams: dict  # constructor arguments for build_optimizer
    schedule: str  # constant | multistep | cosine
    milestones: list[float]  # fractions of all steps
    gamma: float
    warmup_fraction: float  # linear warm-up from lr 0 over this fraction of all steps (any schedule)
    grad_clip: float | None  # passed to the optimizer as hparams["max_grad_norm"]; None: no clipping
    amp: str  # "none" | "bf16"
    channels_last: bool
    device: str  # auto | cpu | cuda | cuda:N
    seed: int
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal
    max_steps_per_epoch: int | None
    eval_batch_size: int
    processes: int  # data-parallel ranks (docs/distributed.md); batch_size stays the global batch
    accumulation: int  # micro-batches per step (gradient accumulation); batch_size is the whole step's
    min_lr_fraction: float  # cosine: the lr decays to this fraction of the initial lr


@dataclass
class TrainResult:
    status: str  # "completed" | "stopped" | "diverged" | "out_of_memory"
    failure_reason: str | None
    epochs_completed: int
    steps: int
    train_seconds: float  # wall time of the epoch loop (training steps and validation)
    ms_per_step: float  # training steps only (no validation), synchronised on CUDA
    device: str
    history: list[dict]
    model: nn.Module
    splits: Splits
    optimizer: torch.optim.Optimizer | None = None
    rank: int = 0  # under data parallelism: this process's rank (only rank 0 evaluates)
    world_size: int = 1
    # epochs of training steps taken, to the step (a member that left mid-epoch: a fraction): what
    # the trial cost, in the unit a study's budget is counted in (run-equivalents = this / epochs)
    epochs_trained: float = 0.0


def lr_factor(spec: TrainSpec, step: int, total: int) -> float:
    """The schedule's multiplier of the initial lr at ``step`` (0-based) of ``total`` steps.

    Warm-up (any schedule, every optimizer): ``step / warm`` over the first ``warm`` =
    ``round(warmup_fraction * total)`` steps, so the first step runs at lr 0 and step ``warm`` at
    the full lr, as the official GPT-2 loop's ``lr * it / warmup_iters`` (the image scripts' cosine
    scheduler also warms up linearly from 0; ``docs/optimizer.md``). Then the schedule: the cosine
    starts at step ``warm``; multistep milestones are fractions of all steps.
    """
    warm = int(round(spec.warmup_fraction * total))
    if step < warm:
        return step / warm
    if spec.schedule == "constant":
        return 1.0
    if spec.schedule == "multistep":
        passed = sum(step >= round(m * total) for m in spec.milestones)
        return spec.gamma**passed
    if spec.schedule == "cosine":
        span = max(total - warm, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * (step - warm) / span))
        floor = spec.min_lr_fraction
        return cosine if floor == 0 else floor + (1.0 - floor) * cosine
    raise UserError(f"Unknown schedule {spec.schedule!r} (expected one of {', '.join(SCHEDULES)})")


def check_spec(spec: TrainSpec) -> None:
    if spec.schedule not in SCHEDULES:
        raise UserError(f"Unknown schedule {spec.schedule!r} (expected one of {', '.join(SCHEDULES)})")
    if spec.amp not in ("none", "bf16"):
        raise UserError(f"Unknown amp mode {spec.amp!r} (expected none or bf16)")
    if spec.epochs < 0 or spec.batch_size < 1 or spec.eval_batch_size < 1:
        raise UserError("epochs must be >= 0 and batch sizes >= 1")
    if not 0.0 <= spec.warmup_fraction < 1.0:
        raise UserError(f"warmup_fraction must be in [0, 1), got {spec.warmup_fraction}")
    if spec.max_steps_per_epoch is not None and spec.max_steps_per_epoch < 1:
        raise UserError("max_steps_per_epoch must be >= 1")
    if spec.accumulation < 1 or spec.batch_size < spec.accumulation:
        raise UserError(f"accumulation must be between 1 and batch_size ({spec.batch_size}), got {spec.accumulation}")
    if not 0.0 <= spec.min_lr_fraction <= 1.0:
        raise UserError(f"min_lr_fraction must be in [0, 1], got {spec.min_lr_fraction}")


def augment_kind(spec: TrainSpec, splits: Splits) -> str | None:
    """The augmentation the batches get (``None``: none), from ``spec.augment`` and the dataset."""
    if spec.augment is False:
        return None
    if spec.augment is None:
        return splits.augment
    if splits.augment:
        return splits.augment
    if len(splits.input_shape) in (2, 3):
        return "crop"
    raise UserError(
        f"augment: true needs image or signal inputs; dataset {splits.name!r} has shape {splits.input_shape}"
    )


def _progress(spec: TrainSpec):
    show = spec.progress if spec.progress is not None else sys.stderr.isatty()
    if not show:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def steps_per_epoch(spec: TrainSpec, n_train: int, world_size: int = 1) -> int:
    """Full batches, plus a last partial one when it has at least 2 examples (at least 1 per rank
    under data parallelism), capped at ``spec.max_steps_per_epoch``."""
    partial = 1 if n_train % spec.batch_size > max(1, world_size - 1) else 0
    steps = n_train // spec.batch_size + partial
    if spec.max_steps_per_epoch is not None:
        steps = min(steps, spec.max_steps_per_epoch)
    return steps


def seed_everything(seed: int) -> None:
    """Seed torch's, Python's and NumPy's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# --------------------------------------------------------------------------------------------
# Members: one trial each
# --------------------------------------------------------------------------------------------


@dataclass
class Member:
    """One trial in the loop: its spec, data, model, optimizer, generators and running metrics."""

    index: int  # position in the caller's list of specs
    spec: TrainSpec
    splits: Splits
    model: nn.Module  # the member's own model (a stacked pack keeps a shared one to evaluate in)
    on_epoch: Callable[[int, dict], bool] | None
    perm_gen: torch.Generator
    aug_gen: torch.Generator
    optimizer: torch.optim.Optimizer = field(init=False)  # set by the stepper (attach)
    base_lrs: list[float] = field(default_factory=list)
    slot: int = 0  # position among the live members (a stacked pack's slice)
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    # the running epoch: this member's batch order, summed loss, correct predictions, examples
    perm: Tensor | None = None  # None for a language model (windows at random offsets)
    loss_sum: Tensor = field(init=False)
    correct: Tensor = field(init=False)
    seen: int = 0

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Use ``optimizer`` (its groups' ``initial_lr`` are the schedule's base)."""
        self.optimizer = optimizer
        self.base_lrs = []
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            self.base_lrs.append(group["initial_lr"])

    def set_lr(self, factor: float) -> None:
        """Every parameter group's lr: its initial lr times the schedule's ``factor``."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def begin_epoch(self, n_train: int, language: bool, device: torch.device) -> None:
        """The epoch's batch order (none for a language model) and zeroed running metrics."""
        self.perm = None if language else torch.randperm(n_train, generator=self.perm_gen, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0

    def count(self, yb: Tensor, loss: Tensor, logits: Tensor) -> None:
        """Add one step's batch (its targets, pass-1 loss and outputs) to the running metrics."""
        self.steps += 1
        self.seen += yb.numel()
        self.loss_sum += loss.double() * yb.numel()
        self.correct += (logits.argmax(-1) == yb).sum()


def build_optimizer_for(spec: TrainSpec, model: Any) -> torch.optim.Optimizer:
    """``spec.optimizer`` over ``model.parameters()`` with ``spec.hparams`` (and ``grad_clip`` as
    ``max_grad_norm``); bad arguments are a one-line :class:`UserError`."""
    hparams = dict(spec.hparams)
    if spec.grad_clip is not None:
        hparams["max_grad_norm"] = spec.grad_clip
    try:
        return build_optimizer(spec.optimizer, model, hparams)
    except (ValueError, TypeError) as exc:
        raise UserError(f"optimizer {spec.optimizer!r}: {exc}") from None


def build_members(
    specs: Sequence[TrainSpec],
    callbacks: Sequence[Callable[[int, dict], bool] | None],
    device: torch.device,
    *,
    splits: Splits | None = None,
    data: dict[int, Splits] | None = None,
) -> list[Member]:
    """Data and model of each spec exactly as a lone run makes them (seeded with the spec's seed;
    the data are read-only, so members with one seed share them, and ``data`` caches them across
    calls). Optimizers are attached by the stepper."""
    data = {} if data is None else data
    members = []
    for i, (spec, on_epoch) in enumerate(zip(specs, callbacks, strict=True)):
        seed_everything(spec.seed)
        if spec.seed not in data:
            data[spec.seed] = (
                load_dataset(
                    spec.dataset, spec.data_dir, val_fraction=spec.val_fraction, label_noise=spec.label_noise,
                    seed=spec.seed, device=device, options=spec.dataset_options,
                )
                if splits is None
                else splits.to(device)
            )
        member_splits = data[spec.seed]
        torch.manual_seed(spec.seed)  # the model's init does not depend on how the data were made
        model = build_model(spec.model, member_splits.input_shape, member_splits.num_classes, **spec.model_options)
        model = model.to(device)
        if spec.channels_last and len(member_splits.input_shape) == 3:
            model = model.to(memory_format=torch.channels_last)
        members.append(
            Member(
                index=i, spec=spec, splits=member_splits, model=model, on_epoch=on_epoch, slot=i,
                perm_gen=torch.Generator(device=device).manual_seed(spec.seed),
                aug_gen=torch.Generator(device=device).manual_seed(spec.seed + 1),
            )
        )
    return members


class Stepper(Protocol):
    """How the loop takes one optimizer step for all live members."""

    def attach(self, members: list[Member]) -> None:
        """Give every member its optimizer (called once, before the first step)."""

    def step(self, live: list[Member], xs: list[Tensor], ys: list[Tensor], weight: float) -> list[tuple[Tensor, Tensor]]:
        """One step on member ``k``'s batch ``(xs[k], ys[k])``: per member (pass-1 loss, pass-1 outputs), detached."""

    def eval_model(self, member: Member) -> nn.Module:
        """A module holding the member's current weights, to evaluate it."""

    def result_model(self, member: Member) -> nn.Module:
        """The member's final model, for its result (it must outlive the loop)."""

    def release(self, live: list[Member]) -> None:
        """Members left: ``live`` are the ones that go on (their ``slot`` is their new position)."""


class LoneSteps:
    """Each member's own model and ``optimizer.step(closure)``: the ordinary trial, and packs with exact kernels."""

    def __init__(self, autocast: Callable[[], Any]) -> None:
        self.autocast = autocast

    def attach(self, members: list[Member]) -> None:
        for m in members:
            m.attach(build_optimizer_for(m.spec, m.model))

    def step(self, live: list[Member], xs: list[Tensor], ys: list[Tensor], weight: float) -> list[tuple[Tensor, Tensor]]:
        out = []
        for m, xb, yb in zip(live, xs, ys, strict=True):
            if m.spec.accumulation > 1:
                out.append(self._accumulated(m, xb, yb, weight))
                continue
            first: list[Tensor] = []

            def closure(model: nn.Module = m.model, xb: Tensor = xb, yb: Tensor = yb, first: list[Tensor] = first) -> Tensor:
                with self.autocast():
                    logits = model(xb)
                    loss = cross_entropy(logits, yb)
                if not first:
                    first.extend((logits.detach(), loss.detach()))
                return loss if weight == 1.0 else loss * weight

            loss = m.optimizer.step(closure)
            if loss is None or weight != 1.0:
                loss = first[1]
            out.append((loss.detach(), first[0]))
        return out

    def _accumulated(self, m: Member, xb: Tensor, yb: Tensor, weight: float) -> tuple[Tensor, Tensor]:
        """One step over ``spec.accumulation`` micro-batches (one closure each, see
        :mod:`sassha_tune.optim.base`); the pass-1 outputs of all of them, in batch order."""
        chunks = list(zip(xb.tensor_split(m.spec.accumulation), yb.tensor_split(m.spec.accumulation), strict=True))
        firsts: list[list[Tensor]] = [[] for _ in chunks]

        def micro(j: int) -> Callable[[], Tensor]:
            def closure() -> Tensor:
                with self.autocast():
                    logits = m.model(chunks[j][0])
                    loss = cross_entropy(logits, chunks[j][1])
                if not firsts[j]:
                    firsts[j].extend((logits.detach(), loss.detach()))
                return loss if weight == 1.0 else loss * weight

            return closure

        m.optimizer.step([micro(j) for j in range(len(chunks))])  # type: ignore[arg-type]  # micro-batches
        # the metrics' loss: the mean of the micro-batches' pass-1 losses, weighted by their sizes
        sizes = torch.tensor([c[1].numel() for c in chunks], dtype=torch.float64, device=yb.device)
        losses = torch.stack([f[1].double() for f in firsts])
        return (losses * sizes).sum() / sizes.sum(), torch.cat([f[0] for f in firsts])

    def eval_model(self, member: Member) -> nn.Module:
        return member.model

    def result_model(self, member: Member) -> nn.Module:
        return member.model

    def release(self, live: list[Member]) -> None:
        pass


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class OutOfMemory:
    """What :func:`train_members` returns when it ran out of memory before any member reported
    and ``may_split`` was set: the caller may retry the members in smaller packs."""

    epoch: int  # 0: while setting up the members, before the first epoch


def train(
    spec: TrainSpec,
    on_epoch: Callable[[int, dict], bool] | None = None,
    *,
    splits: Splits | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    measure: Callable[[int, nn.Module, Splits], dict[str, Any]] | None = None,
) -> TrainResult:
    """Train ``spec.model`` on ``spec.dataset`` with ``spec.optimizer``; never raises on divergence/OOM."""
    check_spec(spec)
    device = resolve_device(spec.device)
    ranks, device = setup(spec.processes, device)
    try:
        (member,) = build_members([spec], [on_epoch], device, splits=splits)
        broadcast_module(member.model, ranks.group)  # identical start on every rank
        results = train_members([member], LoneSteps(_autocast(spec, device)), device, ranks=ranks,
                                progress=_progress(spec) if ranks.is_main else None,
                                on_step=on_step if ranks.is_main else None, measure=measure)
    finally:
        ranks.close()
    assert not isinstance(results, OutOfMemory)
    return results[0]


def _autocast(spec: TrainSpec, device: torch.device) -> Callable[[], Any]:
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if spec.amp == "bf16" else nullcontext


def train_members(
    members: list[Member],
    stepper: Stepper,
    device: torch.device,
    *,
    on_leave: Callable[[int, TrainResult], None] | None = None,
    may_split: bool = False,
    ranks: Ranks | None = None,
    progress: Any = None,
    on_step: Callable[[int, int, int], None] | None = None,
    measure: Callable[[int, nn.Module, Splits], dict[str, Any]] | None = None,
) -> list[TrainResult] | OutOfMemory:
    """Train ``members`` (all with the same task; see :func:`build_members`) in lockstep.

    A member that diverges or is stopped by its ``on_epoch`` leaves; the others go on unchanged.
    ``on_leave(index, result)`` is called as soon as a member is done, so its trial can be told
    while the others train. Out of memory: every member still training fails ``out_of_memory``,
    unless ``may_split`` and nobody reported yet (no ``on_epoch`` call, no member left): then
    :class:`OutOfMemory` is returned. Results are in the order of ``members``. ``on_step(epoch,
    step, steps)``: after every step; ``measure``: extra metrics after each epoch (module docstring).
    """
    ranks = ranks if ranks is not None else Ranks()
    loop = _Lockstep(members, stepper, device, ranks, on_leave=on_leave, progress=progress, on_step=on_step,
                     measure=measure)
    return loop.run(may_split)


class _Lockstep:
    """One run of :func:`train_members`: the members still training, the global step, the clocks
    and whether anybody was told anything yet. Its methods are the loop's steps, in the order they
    run: :meth:`run` (setup, the epochs, the end and out-of-memory handling), :meth:`_train_epoch`,
    :meth:`_take_step` (one optimizer step for all live members), :meth:`_after_step` (progress,
    divergence), :meth:`_end_epoch` (validation, ``on_epoch``), :meth:`_leave`."""

    def __init__(
        self,
        members: list[Member],
        stepper: Stepper,
        device: torch.device,
        ranks: Ranks,
        *,
        on_leave: Callable[[int, TrainResult], None] | None,
        progress: Any,
        on_step: Callable[[int, int, int], None] | None,
        measure: Callable[[int, nn.Module, Splits], dict[str, Any]] | None,
    ) -> None:
        self.members, self.stepper, self.device, self.ranks = members, stepper, device, ranks
        self.on_leave, self.progress, self.on_step, self.measure = on_leave, progress, on_step, measure
        self.spec = members[0].spec  # what the members share: the task, epochs, batch size, ...
        stepper.attach(members)
        splits = members[0].splits
        self.n_train = len(splits.y_train)
        self.per_epoch = steps_per_epoch(self.spec, self.n_train, ranks.world_size)
        self.total_steps = max(self.spec.epochs * self.per_epoch, 1)
        self.aug = augment_kind(self.spec, splits)
        self.language = splits.is_language
        self.block = splits.input_shape[0] if self.language else 0
        self.channels_last = self.spec.channels_last and len(splits.input_shape) == 3

        self.results: dict[int, TrainResult] = {}
        self.live = list(members)
        self.step = 0
        self.step_seconds = 0.0  # training steps only (no validation), synchronised on CUDA
        self.stepping_since: float | None = None  # the start of the running epoch's steps
        self.epoch = 0
        self.reported = False  # a member called its on_epoch or left: from then on the members cannot be restarted
        self.task: Any = None
        self.t_start = 0.0

    def run(self, may_split: bool) -> list[TrainResult] | OutOfMemory:
        cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        progress = self.progress
        self.task = progress.add_task("training", total=self.total_steps) if progress else None
        hessian.warm_up()  # torch's lazy imports at the first Hessian-vector product: not training time
        self.t_start = time.perf_counter()
        split = False
        quirks = ExitStack()
        try:
            if progress:
                progress.start()
            for m in self.live:
                m.model.train()
                quirks.enter_context(onednn_workaround(m.model))
            for epoch in range(1, self.spec.epochs + 1):
                self.epoch = epoch
                if not self.live:
                    break
                self._train_epoch()
            self._complete()
        except OOM_ERRORS:
            split = self._out_of_memory(may_split)
        finally:
            quirks.close()
            if progress:
                progress.stop()
            if self.device.type == "cuda":
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags
        if split:
            return OutOfMemory(self.epoch)
        return [self.results[m.index] for m in self.members]

    # -- an epoch ------------------------------------------------------------------------------

    def _train_epoch(self) -> None:
        """The epoch's steps, then its validation; members that diverge or are stopped leave."""
        t_epoch = time.perf_counter()
        _sync(self.device)
        self.stepping_since = time.perf_counter()
        for m in self.live:
            m.begin_epoch(self.n_train, self.language, self.device)
        for i in range(self.per_epoch):
            diverged = self._take_step(i)
            self._after_step(i, diverged)
            if not self.live:
                break
        _sync(self.device)
        self.step_seconds += time.perf_counter() - self.stepping_since
        self.stepping_since = None
        gone = [m for m in list(self.live) if self._end_epoch(m, t_epoch)]
        self._drop(gone)

    def _take_step(self, i: int) -> list[Member]:
        """Step ``i`` of the epoch for every live member; returns those whose loss diverged (checked
        every 10 steps and at the epoch's end). Its batches are freed when it returns, before any
        callback runs."""
        xs, ys = self._batches(i)
        weight = 1.0
        if self.ranks.world_size > 1:  # this rank's slice; weighted so the ranks' mean is the batch mean
            n_global = len(ys[0])
            xs = [xs[0].tensor_split(self.ranks.world_size)[self.ranks.rank]]
            ys = [ys[0].tensor_split(self.ranks.world_size)[self.ranks.rank]]
            weight = len(ys[0]) * self.ranks.world_size / n_global
        outcome = self.stepper.step(self.live, xs, ys, weight)
        self.step += 1
        check = i % 10 == 9 or i == self.per_epoch - 1
        diverged = []
        for m, yb, (loss, logits) in zip(self.live, ys, outcome, strict=True):
            m.count(yb, loss, logits)
            if check and any_true(not bool(torch.isfinite(m.loss_sum)), self.ranks.group):
                diverged.append(m)
        return diverged

    def _batches(self, i: int) -> tuple[list[Tensor], list[Tensor]]:
        """Batch ``i`` of every live member (augmented), with the lr of this step set."""
        xs, ys = [], []
        for m in self.live:
            xb, yb = self._batch(m, i)
            xs.append(xb)
            ys.append(yb)
            m.set_lr(lr_factor(m.spec, self.step, self.total_steps))
        if self.channels_last:
            xs = [xb.contiguous(memory_format=torch.channels_last) for xb in xs]
        return xs, ys

    def _batch(self, m: Member, i: int) -> tuple[Tensor, Tensor]:
        batch_size = self.spec.batch_size
        if self.language:  # windows at random offsets of the token stream
            assert m.splits.tokens_train is not None
            xb, yb = token_windows(m.splits.tokens_train, self.block, batch_size, m.perm_gen)
        else:
            assert m.perm is not None
            idx = m.perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = m.splits.x_train[idx], m.splits.y_train[idx]
        if self.aug:
            xb = augment_batch(xb, self.aug, m.aug_gen)
        return xb, yb

    def _after_step(self, i: int, diverged: list[Member]) -> None:
        """Progress and ``on_step``, then the diverged members leave."""
        if self.progress:
            self.progress.update(self.task, advance=1, description=f"epoch {self.epoch}/{self.spec.epochs}")
        if self.on_step is not None:
            self.on_step(self.epoch, i + 1, self.per_epoch)
        for m in diverged:
            self._leave(m, "diverged", "diverged")
        self._drop(diverged)

    def _end_epoch(self, m: Member, t_epoch: float) -> bool:
        """The epoch's metrics and validation of ``m``, and its ``on_epoch``; True if it left."""
        if self.ranks.world_size > 1:
            self._sum_over_ranks(m)
        metrics, bad_val, stop = None, False, False
        if self.ranks.is_main:  # validation and the pruning decision once, on rank 0; shared below
            metrics, bad_val, stop = self._validate(m, t_epoch)
        metrics, bad_val, stop = broadcast_object((metrics, bad_val, stop), self.ranks.group)
        if not self.ranks.is_main and not bad_val:
            m.history.append(metrics)
        if bad_val:
            self._leave(m, "diverged", "diverged")
        elif stop:
            self._leave(m, "stopped", None)
        return bad_val or stop

    def _sum_over_ranks(self, m: Member) -> None:
        """The epoch's training metrics over the global batches."""
        ranks = self.ranks
        totals = torch.stack([m.loss_sum, m.correct.double(), torch.full_like(m.loss_sum, m.seen)])
        all_reduce_mean([totals], ranks.group)
        totals *= ranks.world_size
        m.loss_sum, m.correct, m.seen = totals[0], totals[1].round().long(), int(totals[2].round())

    def _validate(self, m: Member, t_epoch: float) -> tuple[dict, bool, bool]:
        """On rank 0: the epoch's metrics, whether validation diverged, whether ``on_epoch`` stops ``m``."""
        model = self.stepper.eval_model(m)
        val_loss, val_acc = evaluate(model, m.splits.x_val, m.splits.y_val, batch_size=self.spec.eval_batch_size)
        metrics = {
            "epoch": self.epoch,
            "train_loss": float(m.loss_sum) / max(m.seen, 1),
            "train_acc": int(m.correct) / max(m.seen, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": m.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t_epoch,
        }
        if self.language:
            metrics["val_ppl"] = perplexity(val_loss)
        bad_val = bool(len(m.splits.y_val)) and not math.isfinite(val_loss)
        if bad_val:
            return metrics, True, False
        if self.measure is not None:
            metrics.update(self.measure(self.epoch, model, m.splits))
        m.history.append(metrics)  # before the callback: the epoch counts even if it raises
        if self.progress:
            self.progress.update(self.task, description=f"epoch {self.epoch}/{self.spec.epochs} val_acc {val_acc:.3f}")
        stop = False
        if m.on_epoch is not None:
            self.reported = True
            # the epoch as reported (not as kept in the history): a classifier's number of
            # classes, so that a listener can tell chance accuracy
            told = dict(metrics) if self.language else {**metrics, "num_classes": int(m.splits.num_classes)}
            stop = bool(m.on_epoch(self.epoch, told))
        return metrics, False, stop

    # -- leaving -------------------------------------------------------------------------------

    def _result(self, m: Member, status: str, failure: str | None, model: nn.Module | None) -> TrainResult:
        seconds = self.step_seconds
        if self.stepping_since is not None:  # a member that leaves in the middle of an epoch's steps
            _sync(self.device)
            seconds += time.perf_counter() - self.stepping_since
        return TrainResult(
            status=status, failure_reason=failure, epochs_completed=len(m.history), steps=m.steps,
            train_seconds=time.perf_counter() - self.t_start,
            ms_per_step=1000.0 * seconds / self.step if self.step else float("nan"),
            device=str(self.device), history=m.history, model=model, splits=m.splits,  # type: ignore[arg-type]
            optimizer=m.optimizer, rank=self.ranks.rank, world_size=self.ranks.world_size,
            epochs_trained=m.steps / self.per_epoch,
        )

    def _leave(self, m: Member, status: str, failure: str | None) -> None:
        self.reported = True
        res = self._result(m, status, failure, self.stepper.result_model(m))
        if self.on_leave is not None:
            self.on_leave(m.index, res)
        # only once told: a member whose on_leave ran out of memory (e.g. its final sharpness
        # metrics) is failed out_of_memory below, as it would be alone, not left untold
        self.results[m.index] = res

    def _drop(self, gone: list[Member]) -> None:
        if not gone:
            return
        ids = {id(m) for m in gone}
        self.live = [m for m in self.live if id(m) not in ids]
        for slot, m in enumerate(self.live):
            m.slot = slot
        if self.live:
            self.stepper.release(self.live)

    def _complete(self) -> None:
        """The members that trained every epoch leave ``completed``."""
        for m in self.live:
            try:
                self._leave(m, "completed", None)
            except OOM_ERRORS:
                # this member's final metrics (sharpness: Hessian-vector products) ran out of
                # memory: it fails as it would alone, and every other finished member still gets
                # its own attempt at its metrics, as it would alone
                self._fail_out_of_memory(m)

    # -- out of memory -------------------------------------------------------------------------

    def _out_of_memory(self, may_split: bool) -> bool:
        """Free what the members hold; True if the caller may restart them in smaller packs, else
        every member not yet done fails ``out_of_memory``."""
        # drop the references that hold activations, graphs and optimizer state, then give memory back
        for m in self.members:  # every member has its optimizer: the stepper attached them before the loop
            m.optimizer.zero_grad(set_to_none=True)
            m.optimizer.state.clear()
        self.stepper.release([])
        # Nobody was told anything yet: the caller may restart the members in smaller packs (and
        # frees the rest of this attempt once its frames are gone). After a report it may not
        # (docs/packs.md, "Out of memory"): the live members fail as out_of_memory.
        split = may_split and not self.reported
        if not split:
            for m in self.members:
                if m.index not in self.results:
                    self._fail_out_of_memory(m)
        return split

    def _fail_out_of_memory(self, m: Member) -> None:
        """Free what can be freed, then fail ``m`` as a lone run that ran out of memory fails."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        res = self._result(m, "out_of_memory", "out_of_memory", m.model)
        self.results[m.index] = res
        if self.on_leave is not None:
            self.on_leave(m.index, res)
