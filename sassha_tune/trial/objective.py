"""Trials, end to end: params -> hparams -> TrainSpec -> train -> metrics -> stored attributes.

:func:`evaluate_trials` is K >= 1 trials as a function: the trial process calls it
(:mod:`sassha_tune.trial.child`) for a study's trial or pack, ``sassha-tune train`` through
:func:`evaluate_params` (one trial). One trial trains alone, K > 1 as a pack trained together
(:func:`sassha_tune.training.packs.train_pack`), and :func:`outcome_from_result` turns a finished
training run into the outcome both store. A trial with ``task.train`` runs the user's function
(:mod:`.user_train`), one with ``device.processes > 1`` as that many rank processes
(:func:`sassha_tune.trial.ranks.launch_ranks`): neither can be packed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..config import Config, config_to_dict
from ..config.spaces import trial_hparams
from ..errors import ConfigError, DataError, UserError
from .attributes import DEVICE, EPOCHS_COMPLETED, EPOCHS_TRAINED, NUM_CLASSES, VAL_ACC
from .measured import finished_outcome, sharpness_attrs, sharpness_during_training
from .outcome import TrialOutcome, json_safe

if TYPE_CHECKING:
    from torch import nn

    from ..training.data import Splits

__all__ = ["final_metrics", "build_spec", "evaluate_trials", "evaluate_params", "outcome_from_result",
           "check_task_inputs"]


def check_task_inputs(cfg: Config) -> None:
    """Before a study is created or a trial asked: a file-based dataset's files exist (a one-line
    :class:`ConfigError` naming ``task.data_dir`` otherwise). A ``task.train`` function brings its
    own data; it was imported when the config was validated."""
    if cfg.task.train is not None:
        return
    from ..training.data import check_dataset_files

    try:
        check_dataset_files(cfg.task.dataset, cfg.task.data_dir, cfg.task.dataset_options)
    except DataError as exc:
        raise ConfigError(f"{cfg.source}: task.data_dir: {exc}") from None


def build_spec(cfg: Config, params: Mapping[str, Any], *, device: str | None = None, progress: bool | None = None):
    from ..training.trainer import TrainSpec

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
        hparams=trial_hparams(cfg, params),
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
        accumulation=t.grad_accumulation,
        min_lr_fraction=cfg.schedule.min_lr_fraction,
    )


def evaluate_trials(
    cfg: Config,
    params_list: Sequence[Mapping[str, Any]],
    *,
    on_epoch: Sequence[Callable[[int, dict], bool] | None] | None = None,
    on_outcome: Callable[[int, TrialOutcome], None] | None = None,
    on_split: Callable[[int, list[list[int]]], None] | None = None,
    device: str | None = None,
    progress: bool | None = None,
    on_phase: Callable[[int, str], None] | None = None,
    on_step: Callable[..., None] | None = None,
    save_models: Sequence[str | None] | None = None,
) -> list[TrialOutcome]:
    """Train K >= 1 trials with the param sets ``params_list`` and measure everything each stores;
    outcome i is trial i's. Raises only UserError / bugs.

    One trial (K = 1) is trained alone by the trainer (:func:`~sassha_tune.training.trainer.train`:
    each optimizer step its own ``optimizer.step``, a progress bar as ``progress`` says), or, with
    ``task.train``, by the user's function (:mod:`.user_train`), or with ``device.processes > 1``
    as that many rank processes (:func:`_evaluate_ranks`). K > 1 trials are a pack, trained together
    (:func:`_evaluate_pack`); only a pack's members store where they ran (``pack_size``, ...).

    ``on_epoch[i]``: trial i's epoch callback (True: prune it). ``on_outcome(i, outcome)``: trial
    i is done (a pack's members are told as each leaves, while the others train on).
    ``on_phase(i, name)``: trial i begins a phase without epoch reports (``"sharpness"``).
    ``on_step(epoch, step, steps[, members])``: after every training step (not for ``task.train``,
    whose steps are its own; a pack adds the members training now); if it has an ``every``
    attribute (seconds: how often it sends steps on), rank 0 of a multi-rank trial reports its
    steps twice that often. ``save_models[i]``: trial i's model file is written there when its run
    completes (:mod:`.saved_model`; None: not). ``on_split``: see :func:`_evaluate_pack`."""
    if len(params_list) > 1:
        return _evaluate_pack(cfg, params_list, on_epoch=on_epoch, on_outcome=on_outcome, on_split=on_split,
                              device=device, on_phase=on_phase, on_step=on_step, save_models=save_models)
    (params,) = params_list
    outcome = _evaluate_one(cfg, params, on_epoch=on_epoch[0] if on_epoch else None, device=device,
                            progress=progress, on_phase=None if on_phase is None else functools.partial(on_phase, 0),
                            on_step=on_step, save_model=save_models[0] if save_models else None)
    if on_outcome is not None:
        on_outcome(0, outcome)
    return [outcome]


def evaluate_params(
    cfg: Config,
    params: Mapping[str, Any],
    *,
    on_epoch: Callable[[int, dict], bool] | None = None,
    device: str | None = None,
    progress: bool | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    save_model: str | None = None,
) -> TrialOutcome:
    """One trial, :func:`evaluate_trials` of ``[params]`` (``sassha-tune train`` calls it);
    ``on_phase(name)``, the other arguments as there for trial 0."""
    (outcome,) = evaluate_trials(
        cfg, [params], on_epoch=[on_epoch], device=device, progress=progress,
        on_phase=None if on_phase is None else (lambda _i, name: on_phase(name)), on_step=on_step,
        save_models=[save_model])
    return outcome


def _evaluate_one(
    cfg: Config,
    params: Mapping[str, Any],
    *,
    on_epoch: Callable[[int, dict], bool] | None,
    device: str | None,
    progress: bool | None,
    on_phase: Callable[[str], None] | None,
    on_step: Callable[[int, int, int], None] | None,
    save_model: str | None,
) -> TrialOutcome:
    """One trial of :func:`evaluate_trials`, on the path its config asks for."""
    from ..distributed import launched_world_size
    from ..training.trainer import train

    if cfg.task.train is not None:  # the user's own training function (task.train)
        from .user_train import evaluate_user_train

        return evaluate_user_train(cfg, params, on_epoch=on_epoch, device=device, on_phase=on_phase)
    if cfg.device.processes > 1 and launched_world_size() <= 1:
        return _evaluate_ranks(cfg, params, on_epoch=on_epoch, device=device, on_phase=on_phase, on_step=on_step,
                               save_model=save_model)
    spec = build_spec(cfg, params, device=device, progress=progress)
    result = train(spec, on_epoch=on_epoch, on_step=on_step, measure=sharpness_during_training(cfg, on_phase))
    if result.rank != 0:  # data parallelism: rank 0 measures and reports
        return TrialOutcome("fail" if result.failure_reason else "complete", failure_reason=result.failure_reason)
    return outcome_from_result(cfg, spec, result, on_phase=on_phase, params=params, save_model=save_model)


def outcome_from_result(cfg: Config, spec: Any, result: Any, *,
                        on_phase: Callable[[str], None] | None = None, params: Mapping[str, Any] | None = None,
                        save_model: str | None = None) -> TrialOutcome:
    """A finished :class:`~sassha_tune.training.trainer.TrainResult` -> the trial's outcome: final metrics,
    sharpness and the stored attributes (shared by single trials and pack members). ``on_phase``:
    see :func:`~.measured.sharpness_attrs`. ``save_model``: a path the model file of a run that
    completed is written to, with the final metrics it was measured at (``params``: the trial's
    hyperparameters, for the config in it)."""
    from ..metrics.evaluation import cross_entropy
    from ..metrics.sharpness import generalization_gap

    attrs: dict[str, Any] = {
        EPOCHS_COMPLETED: result.epochs_completed,
        EPOCHS_TRAINED: round(result.epochs_trained, 6),
        "train_seconds": result.train_seconds,
        "ms_per_step": result.ms_per_step,
        DEVICE: result.device,
    }
    # The number of classes of the splits the trainer used, so that a report can tell a trial
    # that finished at chance accuracy (1 / num_classes) from one that learned something without
    # guessing the dataset's classes (sassha_tune.report.near_chance). Stored on failed and
    # pruned trials too; pack members get it here as well.
    splits = getattr(result, "splits", None)
    if splits is not None:
        attrs[NUM_CLASSES] = int(splits.num_classes)
    if result.world_size > 1:
        attrs["processes"] = result.world_size
    history = [dict(h) for h in result.history]
    if history:
        attrs[VAL_ACC] = history[-1].get("val_acc")
        attrs["val_loss"] = history[-1].get("val_loss")
    if result.status in ("diverged", "out_of_memory"):
        return TrialOutcome("fail", json_safe(attrs), failure_reason=result.failure_reason or result.status, history=history)
    if result.status == "stopped":
        return TrialOutcome("pruned", json_safe(attrs), history=history)

    final = final_metrics(result.model, result.splits, batch_size=spec.eval_batch_size)
    if save_model is not None:  # the weights the final metrics were measured on, before sharpness runs
        from .saved_model import save_trained_model

        save_trained_model(save_model, result.model, cfg, spec, params or {}, result.splits, final)
    attrs.update(final)
    attrs.update(
        generalization_gap(
            {"acc": final["train_acc"], "loss": final["train_loss"]},
            {"acc": final["val_acc"], "loss": final["val_loss"]},
        )
    )
    splits = result.splits
    attrs.update(sharpness_attrs(cfg, result.model, cross_entropy if splits.is_language else None,  # None: classes
                                 splits.x_train, splits.y_train, on_phase=on_phase))
    return finished_outcome(cfg, attrs, history)


def _evaluate_ranks(
    cfg: Config, params: Mapping[str, Any], *, on_epoch: Callable[[int, dict], bool] | None, device: str | None,
    on_phase: Callable[[str], None] | None = None, on_step: Callable[[int, int, int], None] | None = None,
    save_model: str | None = None,
) -> TrialOutcome:
    """``device.processes: N``: run the trial as N rank processes (:func:`~sassha_tune.trial.ranks.launch_ranks`);
    rank 0's result is the trial's, a rank that dies fails it with ``rank_failed: ...``."""
    from .ranks import launch_ranks

    job = {"config": config_to_dict(cfg), "params": dict(params), "device": device, "prune": on_epoch is not None,
           # rank 0 tells this process its steps twice as often as this one sends them on, so that
           # the two throttles in a row still pass about one a second
           "steps": None if on_step is None else getattr(on_step, "every", 0.0) / 2,
           "save_model": save_model}  # rank 0 writes it
    result, epochs, failure = launch_ranks(job, cfg.device.processes, on_epoch, on_phase=on_phase, on_step=on_step)
    history = [dict(m.get("metrics") or {}) for m in epochs]
    if failure is not None or result is None:
        attrs = {"processes": cfg.device.processes, EPOCHS_COMPLETED: len(history)}
        return TrialOutcome("fail", attrs, failure_reason=failure or "rank_failed: no result", history=history)
    if result.get("type") == "user_error":
        raise UserError(str(result.get("message")))
    return TrialOutcome.from_message(result, history)


def _evaluate_pack(
    cfg: Config, params_list: Sequence[Mapping[str, Any]], *,
    on_epoch: Sequence[Callable[[int, dict], bool] | None] | None, on_outcome: Callable[[int, TrialOutcome], None] | None,
    on_split: Callable[[int, list[list[int]]], None] | None, device: str | None,
    on_phase: Callable[[int, str], None] | None, on_step: Callable[[int, int, int, list[int]], None] | None,
    save_models: Sequence[str | None] | None,
) -> list[TrialOutcome]:
    """K > 1 trials of :func:`evaluate_trials` as a pack (:func:`~sassha_tune.training.packs.train_pack`).

    A pack that runs out of memory before any member reported is split in halves (``train_pack``'s
    ``split_on_oom``; ``on_split(epoch, halves)`` is told). Each outcome records the pack the member
    actually ran in: ``pack_size``, ``pack_index`` (its position there) and, after a split,
    ``pack_oom_sizes`` (the sizes of the packs it was in that ran out of memory, largest first)."""
    from ..training.packs import train_pack

    specs = [build_spec(cfg, p, device=device, progress=False) for p in params_list]
    outcomes: dict[int, TrialOutcome] = {}
    placed = {i: (len(specs), i) for i in range(len(specs))}  # member -> (pack size, index in that pack)
    oom_sizes: dict[int, list[int]] = {i: [] for i in range(len(specs))}

    def split(epoch: int, halves: list[list[int]]) -> None:
        size = sum(len(h) for h in halves)
        for half in halves:
            for j, i in enumerate(half):
                placed[i] = (len(half), j)
                oom_sizes[i].append(size)
        if on_split is not None:
            on_split(epoch, halves)

    def leave(i: int, result: Any) -> None:
        member_phase = None if on_phase is None else functools.partial(on_phase, i)
        outcome = outcome_from_result(cfg, specs[i], result, on_phase=member_phase, params=params_list[i],
                                      save_model=save_models[i] if save_models else None)
        outcome.attrs["pack_size"], outcome.attrs["pack_index"] = placed[i]
        if oom_sizes[i]:
            outcome.attrs["pack_oom_sizes"] = list(oom_sizes[i])
        outcomes[i] = outcome
        if on_outcome is not None:
            on_outcome(i, outcome)

    train_pack(specs, on_epoch=on_epoch, on_leave=leave, split_on_oom=True, on_split=split, on_step=on_step,
               measure=sharpness_during_training(cfg))
    return [outcomes[i] for i in range(len(specs))]


def final_metrics(model: nn.Module, splits: Splits, *, batch_size: int = 1024) -> dict:
    """Train (full, un-augmented, the labels trained on), validation and test loss/accuracy of
    ``model`` on ``splits``.

    With label noise, ``train_clean_acc`` / ``train_clean_loss`` use the original labels. Language
    models: per token, and ``train_ppl`` / ``val_ppl`` / ``test_ppl`` too.
    """
    from ..metrics.evaluation import evaluate, perplexity

    s, m = splits, model
    out: dict = {}
    for split, x, y in (
        ("train", s.x_train, s.y_train),
        ("val", s.x_val, s.y_val),
        ("test", s.x_test, s.y_test),
    ):
        loss, acc = evaluate(m, x, y, batch_size=batch_size)
        out[f"{split}_loss"], out[f"{split}_acc"] = loss, acc
        if s.is_language:
            out[f"{split}_ppl"] = perplexity(loss)
    if s.y_train_clean is not None:
        out["train_clean_loss"], out["train_clean_acc"] = evaluate(
            m, s.x_train, s.y_train_clean, batch_size=batch_size
        )
    return out
