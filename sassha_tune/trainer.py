"""One training run: ``train(TrainSpec) -> TrainResult``, plus ``evaluate`` and ``final_metrics``.

The data live on the device as tensors; batches come from a seeded permutation and are augmented
on the device. Every step is ``loss = optimizer.step(closure)`` (see :mod:`sassha_tune.optim.base`),
whatever the optimizer: the trainer never branches on its name. The learning rate of every
parameter group is set before each step from the group's initial lr times the schedule factor.

Epochs are numbered from 1: ``history[i]["epoch"] == i + 1`` and ``on_epoch(epoch, metrics)`` is
called with that number after the epoch's validation; returning True stops the run ("stopped").
"""

from __future__ import annotations

import gc
import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .data import Splits, augment_batch, load_dataset
from .devices import onednn_workaround, resolve_device
from .devices import synchronize as _sync
from .errors import UserError
from .models import build_model
from .optim import build_optimizer

SCHEDULES = ("constant", "multistep", "cosine")
_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)} - {None}
)


@dataclass
class TrainSpec:
    dataset: str = "mnist1d"
    data_dir: str | None = None
    dataset_options: dict = field(default_factory=dict)
    model: str = "cnn1d"
    model_options: dict = field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 128
    augment: bool | None = None  # None: the dataset's default; True: that default (or "crop" for images)
    label_noise: float = 0.0
    val_fraction: float = 0.1
    optimizer: str = "sgd"
    hparams: dict = field(default_factory=dict)  # constructor arguments for build_optimizer
    schedule: str = "constant"  # constant | multistep | cosine
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of all steps
    gamma: float = 0.1
    warmup_fraction: float = 0.0  # linear warm-up over this fraction of all steps (any schedule)
    grad_clip: float | None = None  # passed to the optimizer as hparams["max_grad_norm"]
    amp: str = "none"  # "none" | "bf16"
    channels_last: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 1024
    processes: int = 1  # data-parallel ranks (docs/distributed.md); batch_size stays the global batch


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


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y) in eval mode, no augmentation.

    Restores the model's train/eval mode. An empty set gives (nan, nan).
    """
    n = len(y)
    if n == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=y.device)
        correct = torch.zeros((), dtype=torch.long, device=y.device)
        for i in range(0, n, batch_size):
            out = model(x[i : i + batch_size]).float()
            yb = y[i : i + batch_size]
            loss_sum += F.cross_entropy(out, yb, reduction="sum").double()
            correct += (out.argmax(1) == yb).sum()
        return float(loss_sum) / n, int(correct) / n
    finally:
        model.train(was_training)


def final_metrics(result: TrainResult, *, batch_size: int = 1024) -> dict:
    """Train (full, un-augmented, the labels trained on), validation and test loss/accuracy.

    With label noise, ``train_clean_acc`` / ``train_clean_loss`` use the original labels.
    """
    s, m = result.splits, result.model
    out: dict = {}
    for split, x, y in (
        ("train", s.x_train, s.y_train),
        ("val", s.x_val, s.y_val),
        ("test", s.x_test, s.y_test),
    ):
        loss, acc = evaluate(m, x, y, batch_size=batch_size)
        out[f"{split}_loss"], out[f"{split}_acc"] = loss, acc
    if s.y_train_clean is not None:
        out["train_clean_loss"], out["train_clean_acc"] = evaluate(
            m, s.x_train, s.y_train_clean, batch_size=batch_size
        )
    return out


def lr_factor(spec: TrainSpec, step: int, total: int) -> float:
    """The schedule's multiplier of the initial lr at ``step`` (0-based) of ``total`` steps."""
    warm = int(round(spec.warmup_fraction * total))
    if step < warm:
        return (step + 1) / warm
    if spec.schedule == "constant":
        return 1.0
    if spec.schedule == "multistep":
        passed = sum(step >= round(m * total) for m in spec.milestones)
        return spec.gamma**passed
    if spec.schedule == "cosine":
        span = max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / span))
    raise UserError(f"Unknown schedule {spec.schedule!r} (expected one of {', '.join(SCHEDULES)})")


def _check_spec(spec: TrainSpec) -> None:
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


def _augment_kind(spec: TrainSpec, splits: Splits) -> str | None:
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


def train(
    spec: TrainSpec,
    on_epoch: Callable[[int, dict], bool] | None = None,
    *,
    splits: Splits | None = None,
) -> TrainResult:
    """Train ``spec.model`` on ``spec.dataset`` with ``spec.optimizer``; never raises on divergence/OOM."""
    _check_spec(spec)
    device = resolve_device(spec.device)
    ranks, device = distributed.setup(spec.processes, device)
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    np.random.seed(spec.seed % 2**32)
    if splits is None:
        splits = load_dataset(
            spec.dataset,
            spec.data_dir,
            val_fraction=spec.val_fraction,
            label_noise=spec.label_noise,
            seed=spec.seed,
            device=device,
            options=spec.dataset_options,
        )
    else:
        splits = splits.to(device)
    aug = _augment_kind(spec, splits)
    image = len(splits.input_shape) == 3
    channels_last = spec.channels_last and image

    torch.manual_seed(spec.seed)  # the model's init does not depend on how the data were made
    model = build_model(spec.model, splits.input_shape, splits.num_classes, **spec.model_options).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    distributed.broadcast_module(model, ranks.group)  # identical start on every rank
    hparams = dict(spec.hparams)
    if spec.grad_clip is not None:
        hparams["max_grad_norm"] = spec.grad_clip
    try:
        optimizer = build_optimizer(spec.optimizer, model, hparams)
    except (ValueError, TypeError) as exc:
        raise UserError(f"optimizer {spec.optimizer!r}: {exc}") from None
    base_lrs = []
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        base_lrs.append(group["initial_lr"])

    n_train = len(splits.y_train)
    # a last partial batch counts when it has >= 2 examples (>= 1 per rank under data parallelism)
    steps_per_epoch = n_train // spec.batch_size + (1 if n_train % spec.batch_size > max(1, ranks.world_size - 1) else 0)
    if spec.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, spec.max_steps_per_epoch)
    total_steps = max(spec.epochs * steps_per_epoch, 1)

    perm_gen = torch.Generator(device=device).manual_seed(spec.seed)
    aug_gen = torch.Generator(device=device).manual_seed(spec.seed + 1)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if spec.amp == "bf16" else nullcontext
    )
    cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    history: list[dict] = []
    status, failure = "completed", None
    step = 0
    step_seconds = 0.0
    progress = _progress(spec) if ranks.is_main else None
    task = progress.add_task("training", total=total_steps) if progress else None
    t_start = time.perf_counter()
    quirks = ExitStack()
    try:
        if progress:
            progress.start()
        model.train()
        quirks.enter_context(onednn_workaround(model))
        for epoch in range(1, spec.epochs + 1):
            t_epoch = time.perf_counter()
            _sync(device)
            t_steps = time.perf_counter()
            perm = torch.randperm(n_train, generator=perm_gen, device=device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            diverged = False
            for i in range(steps_per_epoch):
                idx = perm[i * spec.batch_size : (i + 1) * spec.batch_size]
                xb, yb = splits.x_train[idx], splits.y_train[idx]
                if aug:
                    xb = augment_batch(xb, aug, aug_gen)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                weight = 1.0
                if ranks.world_size > 1:  # this rank's slice; weighted so the ranks' mean is the batch mean
                    n_global = len(yb)
                    xb, yb = xb.tensor_split(ranks.world_size)[ranks.rank], yb.tensor_split(ranks.world_size)[ranks.rank]
                    weight = len(yb) * ranks.world_size / n_global
                factor = lr_factor(spec, step, total_steps)
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * factor
                first: list[Tensor] = []

                def closure(
                    xb: Tensor = xb, yb: Tensor = yb, first: list[Tensor] = first, weight: float = weight
                ) -> Tensor:
                    with autocast():
                        out = model(xb)
                        loss = F.cross_entropy(out, yb)
                    if not first:
                        first.extend((out.detach(), loss.detach()))
                    return loss if weight == 1.0 else loss * weight

                loss = optimizer.step(closure)
                if loss is None or weight != 1.0:
                    loss = first[1]
                step += 1
                seen += len(yb)
                loss_sum += loss.detach().double() * len(yb)
                correct += (first[0].argmax(1) == yb).sum()
                if progress:
                    progress.update(task, advance=1, description=f"epoch {epoch}/{spec.epochs}")
                if (i % 10 == 9 or i == steps_per_epoch - 1) and distributed.any_true(
                    not bool(torch.isfinite(loss_sum)), ranks.group
                ):
                    diverged = True
                    break
            _sync(device)
            step_seconds += time.perf_counter() - t_steps
            if diverged:
                status, failure = "diverged", "diverged"
                break
            if ranks.world_size > 1:  # the epoch's training metrics over the global batches
                totals = torch.stack([loss_sum, correct.double(), torch.full_like(loss_sum, seen)])
                distributed.all_reduce_mean([totals], ranks.group)
                totals *= ranks.world_size
                loss_sum, correct, seen = totals[0], totals[1].round().long(), int(totals[2].round())
            metrics, bad_val, stop = None, False, False
            if ranks.is_main:  # validation and the pruning decision once, on rank 0; shared below
                val_loss, val_acc = evaluate(model, splits.x_val, splits.y_val, batch_size=spec.eval_batch_size)
                metrics = {
                    "epoch": epoch,
                    "train_loss": float(loss_sum) / max(seen, 1),
                    "train_acc": int(correct) / max(seen, 1),
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - t_epoch,
                }
                bad_val = bool(len(splits.y_val)) and not math.isfinite(val_loss)
                if progress and not bad_val:
                    progress.update(task, description=f"epoch {epoch}/{spec.epochs} val_acc {val_acc:.3f}")
                stop = not bad_val and on_epoch is not None and bool(on_epoch(epoch, dict(metrics)))
            metrics, bad_val, stop = distributed.broadcast_object((metrics, bad_val, stop), ranks.group)
            if bad_val:
                status, failure = "diverged", "diverged"
                break
            history.append(metrics)
            if stop:
                status = "stopped"
                break
    except _OOM_ERRORS:
        status, failure = "out_of_memory", "out_of_memory"
        # drop the references that hold activations, graphs and optimizer state, then give memory back
        xb = yb = idx = perm = first = loss = None  # noqa: F841
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finally:
        quirks.close()
        if progress:
            progress.stop()
        if device.type == "cuda":
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags
        ranks.close()
    train_seconds = time.perf_counter() - t_start
    return TrainResult(
        status=status,
        failure_reason=failure,
        epochs_completed=len(history),
        steps=step,
        train_seconds=train_seconds,
        ms_per_step=1000.0 * step_seconds / step if step else float("nan"),
        device=str(device),
        history=history,
        model=model,
        splits=splits,
        optimizer=optimizer,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )
