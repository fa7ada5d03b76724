"""One trial, end to end: params -> hparams -> TrainSpec -> train -> metrics -> stored attributes.

:func:`evaluate_params` is the whole trial as a function (``sassha-tune train`` calls it directly).
``python -m sassha_tune.objective`` runs it in a fresh process for :mod:`sassha_tune.study`: the
job arrives as one JSON line on stdin, messages go back as JSON lines on stdout (anything the
trial prints is redirected to stderr), and the parent answers each per-epoch message with
``go`` or ``stop`` when it prunes. A fresh process per trial means a CUDA out-of-memory error or a
leaked graph cannot poison the next trial. The process exits when its parent dies.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import Config, config_from_dict
from .errors import UserError
from .spaces import to_hparams

__all__ = ["TrialOutcome", "STORED_ATTRS", "build_spec", "evaluate_params", "outcome_from_result", "main"]

# The user attributes every finished trial stores (docs/architecture.md, "Stored trial attributes").
STORED_ATTRS = (
    "val_acc", "val_loss", "train_acc", "train_loss", "test_acc", "test_loss", "gen_gap_acc", "gen_gap_loss",
    "lambda_max", "hessian_trace", "hessian_trace_se", "sam_sharpness", "adaptive_sharpness",
    "epochs_completed", "train_seconds", "ms_per_step", "hvp_count", "device", "num_classes",
)
_SHARPNESS_KEYS = ("lambda_max", "hessian_trace", "hessian_trace_se", "sam_sharpness", "adaptive_sharpness", "hvp_count")


@dataclass
class TrialOutcome:
    state: str  # "complete" | "pruned" | "fail"
    attrs: dict[str, Any] = field(default_factory=dict)
    values: list[float] | None = None
    failure_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "result",
            "state": self.state,
            "attrs": self.attrs,
            "values": self.values,
            "failure_reason": self.failure_reason,
        }


def merged_params(cfg: Config, params: Mapping[str, Any]) -> dict[str, Any]:
    """``optimizer.fixed`` plus the trial's params, in the config convention."""
    merged = dict(cfg.optimizer.fixed)
    merged.update(params)
    return merged


def build_spec(cfg: Config, params: Mapping[str, Any], *, device: str | None = None, progress: bool | None = None):
    from .trainer import TrainSpec

    t = cfg.task
    return TrainSpec(
        dataset=t.dataset,
        data_dir=t.data_dir,
        dataset_options=dict(t.dataset_options),
        model=t.model,
        model_options=dict(t.model_options),
        epochs=t.epochs,
        batch_size=t.batch_size,
        augment=t.augment,
        label_noise=t.label_noise,
        val_fraction=t.val_fraction,
        optimizer=cfg.optimizer.name,
        hparams=to_hparams(cfg.optimizer.name, merged_params(cfg, params), seed=cfg.seed),
        schedule=cfg.schedule.name,
        milestones=list(cfg.schedule.milestones),
        gamma=cfg.schedule.gamma,
        warmup_fraction=cfg.schedule.warmup_fraction,
        grad_clip=cfg.optimizer.grad_clip or None,
        amp=cfg.device.amp,
        channels_last=cfg.device.channels_last,
        device=device or cfg.device.name,
        seed=cfg.seed,
        progress=progress,
        max_steps_per_epoch=t.max_steps_per_epoch,
        eval_batch_size=t.eval_batch_size,  # config validation fills in the default
        processes=cfg.device.processes,
    )


def _clean(value: Any) -> Any:
    """JSON-safe attribute values: non-finite floats become None, tensors become numbers."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def evaluate_params(
    cfg: Config,
    params: Mapping[str, Any],
    *,
    on_epoch: Callable[[int, dict], bool] | None = None,
    device: str | None = None,
    progress: bool | None = None,
) -> TrialOutcome:
    """Train with ``params`` and measure everything a trial stores. Raises only UserError / bugs."""
    from .distributed import launched_world_size
    from .trainer import train

    if cfg.device.processes > 1 and launched_world_size() <= 1:
        return _evaluate_ranks(cfg, params, on_epoch=on_epoch, device=device)
    spec = build_spec(cfg, params, device=device, progress=progress)
    result = train(spec, on_epoch=on_epoch)
    if result.rank != 0:  # data parallelism: rank 0 measures and reports
        return TrialOutcome("fail" if result.failure_reason else "complete", failure_reason=result.failure_reason)
    return outcome_from_result(cfg, spec, result)


def outcome_from_result(cfg: Config, spec: Any, result: Any) -> TrialOutcome:
    """A finished :class:`~sassha_tune.trainer.TrainResult` -> the trial's outcome: final metrics,
    sharpness and the stored attributes (shared by single trials and pack members)."""
    from .sharpness import generalization_gap, hessian_metrics
    from .trainer import final_metrics

    attrs: dict[str, Any] = {
        "epochs_completed": result.epochs_completed,
        "train_seconds": result.train_seconds,
        "ms_per_step": result.ms_per_step,
        "device": result.device,
    }
    # The number of classes of the splits the trainer used, so that a report can tell a trial
    # that finished at chance accuracy (1 / num_classes) from one that learned something without
    # guessing the dataset's classes (sassha_tune.report.near_chance). Stored on failed and
    # pruned trials too; pack members get it here as well.
    splits = getattr(result, "splits", None)
    if splits is not None:
        attrs["num_classes"] = int(splits.num_classes)
    if result.world_size > 1:
        attrs["processes"] = result.world_size
    history = [dict(h) for h in result.history]
    if history:
        attrs["val_acc"] = history[-1].get("val_acc")
        attrs["val_loss"] = history[-1].get("val_loss")
    if result.status in ("diverged", "out_of_memory"):
        return TrialOutcome("fail", _clean(attrs), failure_reason=result.failure_reason or result.status, history=history)
    if result.status == "stopped":
        return TrialOutcome("pruned", _clean(attrs), history=history)

    final = final_metrics(result, batch_size=spec.eval_batch_size)
    attrs.update(final)
    attrs.update(
        generalization_gap(
            {"acc": final["train_acc"], "loss": final["train_loss"]},
            {"acc": final["val_acc"], "loss": final["val_loss"]},
        )
    )
    if cfg.metrics.sharpness:
        splits = result.splits
        sharp = hessian_metrics(
            result.model,
            None,
            splits.x_train,
            splits.y_train,
            seed=cfg.metrics.seed,
            subset_size=cfg.metrics.subset_size,
            **cfg.metrics.budget,
        )
        for key in _SHARPNESS_KEYS:
            attrs[key] = sharp.get(key)
        attrs["sharpness_protocol"] = sharp.get("protocol")
        attrs["sharpness_seconds"] = sharp.get("seconds")
    else:
        for key in _SHARPNESS_KEYS:
            attrs[key] = None
    attrs = _clean(attrs)
    values = []
    for metric in cfg.study.metrics:
        v = attrs.get(metric)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return TrialOutcome("fail", attrs, failure_reason=f"error: objective {metric} is not finite", history=history)
        values.append(float(v))
    return TrialOutcome("complete", attrs, values=values, history=history)


def _evaluate_ranks(
    cfg: Config, params: Mapping[str, Any], *, on_epoch: Callable[[int, dict], bool] | None, device: str | None
) -> TrialOutcome:
    """``device.processes: N``: run the trial as N rank processes (:func:`.distributed.launch_ranks`);
    rank 0's result is the trial's, a rank that dies fails it with ``rank_failed: ...``."""
    from .config import config_to_dict
    from .distributed import launch_ranks

    job = {"config": config_to_dict(cfg), "params": dict(params), "device": device, "prune": on_epoch is not None}
    result, epochs, failure = launch_ranks(job, cfg.device.processes, on_epoch)
    history = [dict(m.get("metrics") or {}) for m in epochs]
    if failure is not None or result is None:
        attrs = {"processes": cfg.device.processes, "epochs_completed": len(history)}
        return TrialOutcome("fail", attrs, failure_reason=failure or "rank_failed: no result", history=history)
    if result.get("type") == "user_error":
        raise UserError(str(result.get("message")))
    return TrialOutcome(
        result["state"], result.get("attrs") or {}, result.get("values"), result.get("failure_reason"), history
    )


# --------------------------------------------------------------------------------------------
# The trial process (python -m sassha_tune.objective)
# --------------------------------------------------------------------------------------------


def _watch_parent(parent: int) -> None:
    """Exit at once when the process that launched us is gone (killed coordinator)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    msg = f"error: {name}: {text}" if text else f"error: {name}"
    return msg[:500]


def main() -> int:
    parent = int(os.environ.get("SASSHA_TUNE_PARENT_PID", os.getppid()))
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray prints of the trial go to stderr, never into the protocol
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()

    def send(msg: dict[str, Any]) -> None:
        try:
            proto.write(json.dumps(msg) + "\n")
            proto.flush()
        except (BrokenPipeError, EOFError, OSError):
            # The parent is gone (e.g. SIGKILLed): nobody reads the result; its heartbeat goes stale
            # and the trial is reconciled as lost. Exit quietly, without flushing the dead pipe.
            os._exit(3)

    line = sys.stdin.readline()
    if not line:
        return 3
    job = json.loads(line)
    prune = bool(job.get("prune"))

    def on_epoch(epoch: int, metrics: dict) -> bool:
        send({"type": "epoch", "epoch": epoch, "metrics": _clean(metrics)})
        if not prune:
            return False
        try:
            reply = sys.stdin.readline()
        except (EOFError, OSError):
            reply = ""
        if not reply:  # the parent is gone
            os._exit(3)
        return reply.strip() == "stop"

    try:
        cfg = config_from_dict(job["config"], source=f"study {job.get('study', '?')} (stored config)")
        outcome = evaluate_params(cfg, job["params"], on_epoch=on_epoch, device=job.get("device"))
    except UserError as exc:
        send({"type": "user_error", "message": str(exc)})
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or a broken plug-in: the trial fails, the study goes on
        traceback.print_exc()
        reason = "out_of_memory" if type(exc).__name__ == "OutOfMemoryError" else one_line(exc)
        send(TrialOutcome("fail", failure_reason=reason).to_json())
        return 1
    send(outcome.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
