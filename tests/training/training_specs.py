"""The TrainSpec these tests train: TrainSpec declares no defaults of its own (the study config
owns them), so a test names only what it changes from the values below -- the ones the training
tests have always trained with (a small MNIST-1D CNN, plain SGD, a constant lr)."""

from __future__ import annotations

from typing import Any

from sassha_tune.training.trainer import TrainSpec

TEST_SPEC: dict[str, Any] = dict(
    dataset="mnist1d", data_dir=None, dataset_options={}, model="cnn1d", model_options={}, epochs=5,
    batch_size=128, augment=None, label_noise=0.0, val_fraction=0.1, optimizer="sgd", hparams={},
    schedule="constant", milestones=[0.5, 0.75], gamma=0.1, warmup_fraction=0.0, grad_clip=None, amp="none",
    channels_last=False, device="auto", seed=0, max_steps_per_epoch=None, eval_batch_size=1024, processes=1,
    accumulation=1, min_lr_fraction=0.0,
)


def make_spec(**overrides: Any) -> TrainSpec:
    """:data:`TEST_SPEC` with ``overrides``; its dicts and lists are fresh copies each time, so no
    two specs share one."""
    defaults = {k: v.copy() if isinstance(v, (dict, list)) else v for k, v in TEST_SPEC.items()}
    return TrainSpec(**{**defaults, **overrides})
