"""A trial's TrainSpec comes whole from the validated config: what a config leaves unwritten
trains with the config's defaults (config/schema.py), never with defaults of the trainer's."""

from __future__ import annotations

from sassha_tune.config import config_from_dict
from sassha_tune.training.trainer import TrainSpec
from sassha_tune.trial.objective import build_spec


def _config(**task):
    return config_from_dict({"study": {"name": "s"}, "task": {"dataset": "mnist1d", "model": "cnn1d", **task},
                             "optimizer": {"name": "sgd"}}, source="test")


def test_a_minimal_config_trains_with_the_config_defaults():
    assert build_spec(_config(), {"lr": 0.05}) == TrainSpec(
        dataset="mnist1d", data_dir=None, dataset_options={}, model="cnn1d", model_options={}, epochs=10,
        batch_size=128, augment=None, label_noise=0.0, val_fraction=0.1, optimizer="sgd", hparams={"lr": 0.05},
        schedule="multistep", milestones=[0.5, 0.75], gamma=0.1, warmup_fraction=0.0, grad_clip=None, amp="none",
        channels_last=False, device="auto", seed=0, progress=None, max_steps_per_epoch=None, eval_batch_size=256,
        processes=1, accumulation=1, min_lr_fraction=0.0,
    )


def test_the_caller_sets_device_and_progress_and_the_eval_batch_follows_the_batch():
    spec = build_spec(_config(batch_size=512), {"lr": 0.05}, device="cpu", progress=False)
    assert (spec.batch_size, spec.eval_batch_size, spec.device, spec.progress) == (512, 512, "cpu", False)
