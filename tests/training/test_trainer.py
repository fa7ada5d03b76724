"""The training loop: accuracy, determinism, schedules, stop/diverge/OOM paths, BN models, plug-ins."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from training_specs import TEST_SPEC, make_spec

from sassha_tune import optim
from sassha_tune.errors import UserError
from sassha_tune.metrics.evaluation import evaluate
from sassha_tune.optim import SGD, OptimizerInfo
from sassha_tune.training.data import load_dataset
from sassha_tune.training.trainer import TrainSpec, build_members, build_optimizer_for, lr_factor, train
from sassha_tune.trial.objective import final_metrics


@pytest.fixture(scope="module")
def mnist1d():
    return load_dataset("mnist1d", seed=0)


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # thread count changes reduction order, hence trajectories
    yield
    torch.set_num_threads(old)


def _strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_trainspec_leaves_every_config_setting_to_its_caller():
    """The study config declares the defaults of what a member trains (config/schema.py, filled
    in by trial.objective.build_spec); a default here would be a second declaration, free to differ.
    Only ``progress``, how the caller shows progress, is no config setting."""
    defaulted = {f.name for f in dataclasses.fields(TrainSpec)
                 if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    assert defaulted == {"progress"}
    with pytest.raises(TypeError, match="epochs"):
        TrainSpec(**{k: v for k, v in TEST_SPEC.items() if k != "epochs"})


def test_member_batch_order_schedule_and_running_metrics(mnist1d):
    """What the loop's steps ask of a member: each epoch the next permutation of its seeded stream,
    every group's lr as its initial lr times the schedule factor, and running sums of a step's
    loss (times its batch size), correct predictions and examples."""
    spec = make_spec(hparams={"lr": 0.2}, device="cpu", seed=3)
    (member,) = build_members([spec], [None], torch.device("cpu"), splits=mnist1d)
    member.attach(build_optimizer_for(spec, member.model))
    member.set_lr(0.25)
    assert [g["lr"] for g in member.optimizer.param_groups] == [0.2 * 0.25] * len(member.optimizer.param_groups)
    assert [g["initial_lr"] for g in member.optimizer.param_groups] == [0.2] * len(member.optimizer.param_groups)

    n = len(mnist1d.y_train)
    stream = torch.Generator().manual_seed(3)
    first, second = torch.randperm(n, generator=stream), torch.randperm(n, generator=stream)
    member.begin_epoch(n, False, torch.device("cpu"))
    assert torch.equal(member.perm, first)
    y = torch.tensor([0, 1, 2])
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])  # predicts 0, 1, 0
    member.count(y, torch.tensor(0.5), logits)
    member.count(y[1:], torch.tensor(2.0), logits[1:])
    assert (member.steps, member.seen, int(member.correct)) == (2, 5, 3)
    assert member.loss_sum.dtype == torch.float64 and float(member.loss_sum) == 0.5 * 3 + 2.0 * 2
    member.begin_epoch(n, False, torch.device("cpu"))
    assert torch.equal(member.perm, second) and member.seen == 0 and float(member.loss_sum) == 0.0
    assert int(member.correct) == 0 and member.steps == 2  # steps count the whole run
    member.begin_epoch(n, True, torch.device("cpu"))
    assert member.perm is None  # a language model draws windows at random offsets instead


@pytest.mark.slow
def test_cnn1d_sgd_reaches_85_percent_on_mnist1d(mnist1d, one_thread):
    spec = make_spec(epochs=12, batch_size=64, hparams={"lr": 0.05}, schedule="cosine", device="cpu", seed=0)
    result = train(spec, splits=mnist1d)
    assert result.status == "completed" and result.failure_reason is None
    assert result.epochs_completed == 12 and len(result.history) == 12
    assert result.steps == 12 * math.ceil(3600 / 64)
    assert result.ms_per_step > 0 and result.train_seconds > 0 and result.device == "cpu"
    m = final_metrics(result.model, result.splits)
    assert m["test_acc"] >= 0.85, m
    assert set(m) == {"train_acc", "train_loss", "val_acc", "val_loss", "test_acc", "test_loss"}
    assert result.history[-1]["lr"] < 0.001  # cosine to ~0
    assert [h["epoch"] for h in result.history] == list(range(1, 13))


def test_same_seed_same_history(mnist1d, one_thread):
    spec = make_spec(
        epochs=2, batch_size=64, max_steps_per_epoch=15, hparams={"lr": 0.05}, device="cpu", seed=4
    )
    a = train(spec, splits=mnist1d)
    b = train(spec, splits=mnist1d)
    assert _strip(a.history) == _strip(b.history)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    spec.seed = 5
    c = train(spec, splits=mnist1d)
    assert _strip(c.history) != _strip(a.history)


def test_same_seed_same_history_with_dataset_loading_and_augmentation():
    spec = make_spec(
        dataset="synthetic",
        dataset_options={"shape": [1, 8, 8], "n": 128, "n_test": 16},
        model="cnn",
        epochs=2,
        batch_size=32,
        augment=True,
        label_noise=0.2,
        hparams={"lr": 0.05},
        device="cpu",
        seed=1,
    )
    a, b = train(spec), train(spec)
    assert _strip(a.history) == _strip(b.history)
    assert a.splits.noisy_indices is not None and len(a.splits.noisy_indices) == round(
        0.2 * len(a.splits.y_train)
    )
    assert "train_clean_acc" in final_metrics(a.model, a.splits)


def test_divergence_is_reported(mnist1d):
    spec = make_spec(model="mlp", epochs=3, hparams={"lr": 1e6}, device="cpu", max_steps_per_epoch=30)
    r = train(spec, splits=mnist1d)
    assert r.status == "diverged" and r.failure_reason == "diverged"
    assert r.epochs_completed == 0 and r.history == [] and 0 < r.steps <= 30


def test_on_epoch_stops(mnist1d):
    calls = []

    def cb(epoch, metrics):
        calls.append((epoch, set(metrics)))
        return epoch == 2

    spec = make_spec(epochs=5, max_steps_per_epoch=3, hparams={"lr": 0.01}, device="cpu")
    r = train(spec, cb, splits=mnist1d)
    assert r.status == "stopped" and r.failure_reason is None and r.epochs_completed == 2
    assert [c[0] for c in calls] == [1, 2]
    # a classifier's epoch report carries its number of classes (the study's chance guard reads it);
    # the history keeps the epoch's metrics only
    assert calls[0][1] == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "num_classes"}
    assert set(r.history[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    assert r.steps == 6


def test_on_step_is_told_every_step_of_every_epoch_in_order(mnist1d):
    steps, order = [], []
    spec = make_spec(epochs=3, max_steps_per_epoch=4, hparams={"lr": 0.01}, device="cpu")
    r = train(spec, lambda epoch, _m: order.append(("epoch", epoch)) or epoch == 2, splits=mnist1d,
              on_step=lambda *at: (steps.append(at), order.append(("step", at[0]))))
    # stopped after epoch 2: epoch 3 never starts
    assert steps == [(e, s, 4) for e in (1, 2) for s in (1, 2, 3, 4)] and r.steps == 8
    assert order == [("step", 1)] * 4 + [("epoch", 1)] + [("step", 2)] * 4 + [("epoch", 2)]


def test_resnet20_bn_trains_on_tiny_images():
    spec = make_spec(
        dataset="synthetic",
        dataset_options={"shape": [3, 16, 16], "n": 40, "n_test": 8},
        model="resnet20",
        model_options={"width": 4},
        epochs=1,
        batch_size=16,
        augment=True,
        channels_last=True,
        hparams={"lr": 0.1, "weight_decay": 5e-4},
        device="cpu",
    )
    r = train(spec)
    assert r.status == "completed" and r.steps == 3  # 36 training samples: 16 + 16 + 4
    bn = next(m for m in r.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.num_batches_tracked.item() == 3
    assert math.isfinite(r.history[0]["val_loss"])


def test_bf16_autocast_on_cpu(mnist1d):
    r = train(
        make_spec(epochs=1, max_steps_per_epoch=3, amp="bf16", device="cpu", hparams={"lr": 0.01}),
        splits=mnist1d,
    )
    assert r.status == "completed" and math.isfinite(r.history[0]["train_loss"])


def test_schedules():
    spec = make_spec(schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(spec, s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    spec = make_spec(schedule="cosine", warmup_fraction=0.1)
    assert lr_factor(spec, 0, 100) == 0.0 and lr_factor(spec, 9, 100) == pytest.approx(0.9)
    assert lr_factor(spec, 10, 100) == pytest.approx(1.0) and lr_factor(spec, 99, 100) < 0.001
    assert lr_factor(make_spec(), 77, 100) == 1.0
    with pytest.raises(UserError, match="schedule"):
        train(make_spec(schedule="linear", device="cpu"))


class _Recorder(SGD):
    """A fake two-pass optimizer: records its hparams and calls the closure twice per step."""

    seen: dict = {}

    def __init__(self, params, max_grad_norm=None, **kw):
        _Recorder.seen = {"max_grad_norm": max_grad_norm, "calls": 0, "lrs": []}
        super().__init__(params, **kw)

    def step(self, closure):
        loss = super().step(closure)
        with torch.no_grad():
            closure()  # the "second pass" must not change the on-the-fly accuracy bookkeeping
        _Recorder.seen["calls"] += 2
        _Recorder.seen["lrs"].append(self.param_groups[0]["lr"])
        return loss


def test_trainer_is_optimizer_agnostic(monkeypatch, mnist1d):
    info = OptimizerInfo("recorder", _Recorder, decoupled_weight_decay=False, seeded=False, batched_packs=False, passes=2)
    monkeypatch.setitem(optim.OPTIMIZERS, "recorder", info)
    spec = make_spec(
        optimizer="recorder",
        hparams={"lr": 0.2},
        grad_clip=1.5,
        epochs=2,
        max_steps_per_epoch=4,
        schedule="multistep",
        milestones=[0.5],
        gamma=0.5,
        device="cpu",
    )
    r = train(spec, splits=mnist1d)
    assert r.status == "completed"
    assert _Recorder.seen["max_grad_norm"] == 1.5 and _Recorder.seen["calls"] == 16
    assert _Recorder.seen["lrs"] == pytest.approx([0.2] * 4 + [0.1] * 4)
    assert r.optimizer.param_groups[0]["initial_lr"] == 0.2
    assert 0.0 <= r.history[0]["train_acc"] <= 1.0


def test_out_of_memory_is_caught(monkeypatch, mnist1d):
    class Boom(SGD):
        def step(self, closure):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    info = OptimizerInfo("boom", Boom, decoupled_weight_decay=False, seeded=False, batched_packs=False, passes=1)
    monkeypatch.setitem(optim.OPTIMIZERS, "boom", info)
    r = train(make_spec(optimizer="boom", hparams={"lr": 0.1}, epochs=2, device="cpu"), splits=mnist1d)
    assert r.status == "out_of_memory" and r.failure_reason == "out_of_memory" and r.epochs_completed == 0


def test_bad_optimizer_args_are_user_errors(mnist1d):
    with pytest.raises(UserError, match="optimizer 'nope'"):
        train(make_spec(optimizer="nope", device="cpu"), splits=mnist1d)
    with pytest.raises(UserError, match="optimizer 'sgd'"):
        train(make_spec(hparams={"lr": 0.1, "bogus": 1}, device="cpu"), splits=mnist1d)


def test_evaluate_restores_mode_and_handles_empty(mnist1d):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 10), torch.nn.Dropout(0.5))
    model.train()
    loss, acc = evaluate(model, mnist1d.x_test, mnist1d.y_test, batch_size=300)
    assert model.training and 0 <= acc <= 1 and loss > 0
    again = evaluate(model, mnist1d.x_test, mnist1d.y_test, batch_size=1000)
    assert again[1] == acc and again[0] == pytest.approx(loss, rel=1e-5)  # no dropout in eval mode
    model.eval()
    evaluate(model, mnist1d.x_test, mnist1d.y_test)
    assert not model.training
    empty = evaluate(model, mnist1d.x_test[:0], mnist1d.y_test[:0])
    assert all(math.isnan(v) for v in empty)


def test_plugins_through_train():
    spec = make_spec(
        dataset="custom",
        dataset_options={"factory": "plugins_example:blobs", "n": 120},
        model="plugins_example:tiny_linear",
        model_options={"scale": 0.5},
        epochs=3,
        batch_size=32,
        hparams={"lr": 0.1},
        device="cpu",
        progress=True,
    )
    r = train(spec)
    assert r.status == "completed" and final_metrics(r.model, r.splits)["test_acc"] > 0.8


def test_steps_per_epoch_one_rule_for_lone_runs_packs_and_ranks():
    from sassha_tune.training.trainer import steps_per_epoch

    spec = make_spec(batch_size=32)
    assert steps_per_epoch(spec, 320) == 10  # full batches only
    assert steps_per_epoch(spec, 321) == 10  # a last batch of 1 example is dropped
    assert steps_per_epoch(spec, 322) == 11  # of 2 it counts
    assert steps_per_epoch(spec, 322, world_size=3) == 10  # under 3 ranks it needs >= 3 (one per rank)
    assert steps_per_epoch(spec, 323, world_size=3) == 11
    assert steps_per_epoch(make_spec(batch_size=32, max_steps_per_epoch=4), 322) == 4


def _tiny_text(tmp_path):
    import random as _random

    rng = _random.Random(1)
    words = "the a cat dog sat on mat ran fast slow big small".split()
    (tmp_path / "c.txt").write_text(" ".join(rng.choice(words) for _ in range(6000)), encoding="utf-8")
    return str(tmp_path)


def _lm_spec(data_dir, **kw):
    base = dict(dataset="text", data_dir=data_dir, dataset_options={"block_size": 16}, model="gpt",
                model_options=dict(n_layer=1, n_head=2, n_embd=32), epochs=2, batch_size=16, max_steps_per_epoch=15,
                optimizer="adamw", hparams=dict(lr=3e-3, weight_decay=0.0), schedule="cosine", device="cpu")
    return make_spec(**{**base, **kw})


def test_language_model_trains_and_reports_per_token_metrics(tmp_path):
    r = train(_lm_spec(_tiny_text(tmp_path)))
    assert r.status == "completed" and r.steps == 30
    first, last = r.history
    assert last["val_loss"] < first["val_loss"] < math.log(256)  # below a uniform guess over bytes
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))
    m = final_metrics(r.model, r.splits)
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"])) and 0 < m["train_acc"] < 1


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    # SGD: two micro-batches give the whole batch's mean gradient (float32: equal up to rounding)
    d = _tiny_text(tmp_path)
    kw = dict(optimizer="sgd", hparams=dict(lr=0.5), epochs=1, max_steps_per_epoch=5)
    whole, split = train(_lm_spec(d, **kw)), train(_lm_spec(d, accumulation=2, **kw))
    for a, b in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert split.history[0]["train_loss"] == pytest.approx(whole.history[0]["train_loss"], rel=1e-5)


def test_warm_up_is_the_official_language_model_schedule():
    """The warm-up and cosine of the official GPT-2 loop (its ``get_lr``, written out here with
    ``lr_decay_iters`` = the run's steps): lr * it / warmup_iters for it < warmup_iters (iteration 0
    at lr 0), then the cosine from the full lr to min_lr. The warm-up is the same before every
    schedule, whatever the optimizer."""
    total, warm, lr, min_lr = 300, 24, 0.3, 1.5e-5

    def official(it: int) -> float:
        if it < warm:
            return lr * it / warm
        coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warm) / (total - warm)))
        return min_lr + coeff * (lr - min_lr)

    spec = make_spec(schedule="cosine", warmup_fraction=warm / total, min_lr_fraction=min_lr / lr)
    ours = [lr * lr_factor(spec, it, total) for it in range(total)]
    assert ours == pytest.approx([official(it) for it in range(total)], rel=1e-12, abs=1e-15)
    assert ours[0] == 0.0 and ours[warm] == pytest.approx(lr)
    for other in (make_spec(schedule="constant", warmup_fraction=0.08), make_spec(schedule="multistep", warmup_fraction=0.08)):
        assert [lr_factor(other, it, total) for it in range(warm + 1)] == pytest.approx([it / warm for it in range(warm + 1)])


def test_first_warm_up_step_leaves_the_model_unchanged(mnist1d, one_thread):
    """Through the trainer: with a warm-up the first step runs at lr 0, so one step of plain SGD
    leaves the freshly initialized model as it was; without a warm-up the same step moves it."""
    kw = dict(batch_size=64, hparams={"lr": 0.1, "momentum": 0.0}, device="cpu", seed=2)
    initial = train(make_spec(epochs=0, **kw), splits=mnist1d).model
    warm = train(make_spec(epochs=1, max_steps_per_epoch=1, warmup_fraction=0.9, **kw), splits=mnist1d)  # 1 warm-up step
    cold = train(make_spec(epochs=1, max_steps_per_epoch=1, **kw), splits=mnist1d)
    assert warm.steps == cold.steps == 1 and warm.history[0]["lr"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(warm.model.parameters(), initial.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(cold.model.parameters(), initial.parameters(), strict=True))


def test_cosine_schedule_floor():
    spec = make_spec(schedule="cosine", min_lr_fraction=0.05)
    assert lr_factor(spec, 0, 100) == pytest.approx(1.0) and lr_factor(spec, 100, 100) == pytest.approx(0.05)
    assert lr_factor(make_spec(schedule="cosine"), 100, 100) == pytest.approx(0.0)
