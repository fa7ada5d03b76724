"""A trial trained by the user's own function: ``task.train: package.module:function``.

For training code that does not fit the built-in trainer (its own data pipeline, a model that
is not "tensors on the device", a HuggingFace model), the trial calls ``function(reporter)`` in
the trial process and stores what it returns, as it stores a built-in trial's metrics. The
:class:`TrialReporter` gives the function what the study chose and takes back what it measures::

    def train(reporter):
        model = make_my_model()
        optimizer = reporter.make_optimizer(model)   # the trial's optimizer and hyperparameters
        for epoch in range(reporter.epochs):
            ...  # the user's loop: loss = optimizer.step(closure)
            reporter.report({"val_acc": val_acc, "train_loss": train_loss})  # may raise TrialPruned
        reporter.sharpness_on(model, x_fixed, y_fixed)  # optional: our sharpness metrics
        return {"val_acc": val_acc, "train_acc": train_acc, "val_loss": val_loss, "train_loss": train_loss}

Everything around the trial is the same as for the built-in tasks: the fresh trial process, the
heartbeats, the budget, retries of lost trials, pruning (through :meth:`TrialReporter.report`),
reports and export.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import optuna

from ..config import Config
from ..config.spaces import trial_hparams
from ..errors import UserError
from ..metrics.names import SHARPNESS_ATTRS
from ..plugins import load_plugin
from .attributes import DEVICE, EPOCHS_COMPLETED, EPOCHS_TRAINED
from .measured import finished_outcome, sharpness_attrs
from .outcome import TrialOutcome, one_line

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["TrialReporter", "TrialPruned", "evaluate_user_train"]

#: what ``report`` raises when the study prunes the trial (Optuna's own exception: the function
#: may let it propagate, or catch it to clean up and re-raise)
TrialPruned = optuna.TrialPruned


class TrialReporter:
    """What a ``task.train`` function gets: the trial's choices, and where its measurements go.

    Attributes:
        optimizer_name: the registry name of the study's optimizer (``"sassha"``, ...).
        hparams: its constructor arguments for this trial (registry defaults, ``optimizer.fixed``
            and the sampled values, weight decay already in the constructor's convention), as
            :meth:`make_optimizer` passes them.
        params: the trial's sampled parameters as Optuna stores them (the config's convention).
        epochs: ``task.epochs`` (the pruner's resource: report at most this many epochs).
        seed: the config's ``seed``.
        device: the trial's device (``"cpu"``, ``"cuda:0"``, ...), resolved from the config.
        options: ``task.train_options``, as written in the config.
    """

    def __init__(self, cfg: Config, params: Mapping[str, Any], *, device: str,
                 on_epoch: Callable[[int, dict], bool] | None) -> None:
        self.optimizer_name = cfg.optimizer.name
        self.hparams = trial_hparams(cfg, params)
        self.params = dict(params)
        self.epochs = cfg.task.epochs
        self.seed = cfg.seed
        self.device = device
        self.options = dict(cfg.task.train_options)
        self.history: list[dict[str, Any]] = []
        self.sharpness_inputs: tuple[Any, ...] | None = None
        self._on_epoch = on_epoch
        # held through a report's epoch message and reply, so that close() waits for one in flight
        self._lock = threading.Lock()
        self._closed = False

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The trial's optimizer over ``model`` (its parameter groups and ``model=`` as the
        registry builds them: the same call as the built-in trainer's)."""
        from ..optim.registry import build_optimizer

        return build_optimizer(self.optimizer_name, model, self.hparams)

    def report(self, metrics: Mapping[str, Any]) -> None:
        """One epoch's metrics (e.g. ``val_acc``, ``train_loss``; floats). Epochs count from 1.
        They become the trial's learning curve and the pruner's input; raises :data:`TrialPruned`
        when the study prunes the trial, and ``RuntimeError`` once the trial has ended (a thread
        the function left running: its late epochs reach neither this trial nor the next)."""
        with self._lock:
            self._check_open("report")
            if len(self.history) >= self.epochs:
                raise UserError(f"task.train: the function reported more than task.epochs = {self.epochs} epochs")
            entry = {"epoch": len(self.history) + 1, **{str(k): _number(k, v) for k, v in metrics.items()}}
            self.history.append(entry)
            if self._on_epoch is not None and self._on_epoch(entry["epoch"], dict(entry)):
                raise TrialPruned(f"pruned at epoch {entry['epoch']}")

    def close(self) -> None:
        """End the reporter with its trial (the function returned or raised): every later call
        raises; waits for a report in flight (its epoch message answered) to finish."""
        with self._lock:
            self._closed = True

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"reporter.{what} called after its trial ended (from a thread the train function "
                               "left running?): it reaches neither that trial nor the next")

    def sharpness_on(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Measure sharpness on ``model`` once the function returns, on a fixed subset of
        ``(inputs, targets)`` (tensors on the model's device; ``loss_fn(outputs, targets)`` returns
        the mean loss, default cross-entropy), with the config's ``metrics`` protocol."""
        self._check_open("sharpness_on")
        self.sharpness_inputs = (model, loss_fn, inputs, targets)  # sharpness_attrs' order


def _number(key: Any, value: Any) -> Any:
    """A metric's value as a number (a 0-d tensor's item); ``TypeError`` naming the metric
    otherwise, which fails the trial as any error of the function does."""
    if hasattr(value, "item") and callable(value.item):  # a 0-d tensor
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"task.train: metric {key!r} must be a number, got {type(value).__name__}")
    return value


def _metrics(function: str, returned: Any) -> dict[str, Any]:
    """What the function returned, as metrics: a mapping of numbers (else ``TypeError``)."""
    if not isinstance(returned, Mapping):
        raise TypeError(f"task.train: {function} must return a mapping of metrics, got {type(returned).__name__}")
    return {str(k): _number(k, v) for k, v in returned.items()}


def evaluate_user_train(cfg: Config, params: Mapping[str, Any], *,
                        on_epoch: Callable[[int, dict], bool] | None, device: str | None,
                        on_phase: Callable[[str], None] | None = None) -> TrialOutcome:
    """Run the trial's ``task.train`` function and turn what it returns into the trial's outcome
    (``on_phase``: told ``"sharpness"`` before the sharpness of ``reporter.sharpness_on`` is measured)."""
    import torch

    from ..devices import resolve_device
    from ..metrics.sharpness import generalization_gap
    from ..optim import hessian

    assert cfg.task.train is not None
    function = load_plugin(cfg.task.train, "task.train")
    torch.manual_seed(cfg.seed)  # as a built-in trial starts: the user may seed again
    reporter = TrialReporter(cfg, params, device=str(resolve_device(device or cfg.device.name)), on_epoch=on_epoch)
    hessian.warm_up()  # torch's lazy imports at the first Hessian-vector product: not the function's time
    start = time.perf_counter()
    try:
        final = _metrics(cfg.task.train, _called(function, reporter))
    except TrialPruned:
        return TrialOutcome("pruned", _attrs(reporter, start), history=reporter.history)
    except UserError:
        raise
    except torch.cuda.OutOfMemoryError:
        return TrialOutcome("fail", _attrs(reporter, start), failure_reason="out_of_memory", history=reporter.history)
    except Exception as exc:  # the user's code failed this trial (or returned no metrics); the study goes on
        return TrialOutcome("fail", _attrs(reporter, start), failure_reason=one_line(exc), history=reporter.history)
    attrs = _attrs(reporter, start)
    attrs.update(final)
    if all(k in final for k in ("train_acc", "val_acc", "train_loss", "val_loss")):
        attrs.update(generalization_gap({"acc": final["train_acc"], "loss": final["train_loss"]},
                                        {"acc": final["val_acc"], "loss": final["val_loss"]}))
    if reporter.sharpness_inputs is not None:
        attrs.update(sharpness_attrs(cfg, *reporter.sharpness_inputs, on_phase=on_phase))
    else:  # a sharpness metric the function returned itself is kept
        for key in SHARPNESS_ATTRS:
            attrs.setdefault(key, None)

    def why_missing(metric: str) -> str:
        if metric in SHARPNESS_ATTRS and reporter.sharpness_inputs is None:
            return "not measured: the train function did not call reporter.sharpness_on"
        return "not returned by the train function" if metric not in final else "is not finite"

    return finished_outcome(cfg, attrs, reporter.history, why_missing)


def _called(function: Callable[[TrialReporter], Any], reporter: TrialReporter) -> Any:
    """``function(reporter)``; the reporter ends with it, whatever threads it left running."""
    try:
        return function(reporter)
    finally:
        reporter.close()


def _attrs(reporter: TrialReporter, start: float) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        EPOCHS_COMPLETED: len(reporter.history),
        EPOCHS_TRAINED: len(reporter.history),  # what the function reported; its steps are its own
        "train_seconds": time.perf_counter() - start,
        DEVICE: reporter.device,
    }
    if reporter.history:
        for key in ("val_acc", "val_loss"):
            if key in reporter.history[-1]:
                attrs[key] = reporter.history[-1][key]
    return attrs
