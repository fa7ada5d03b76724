"""Trial packs that run out of memory: split in halves and retried from scratch (sassha_tune.training.packs).

There is no GPU in CI and the CPU allocator cannot be exhausted safely, so the out-of-memory error
is emulated by a model plug-in, ``plugins_example:memory_limited``: its forward raises
``torch.OutOfMemoryError`` when the pack's stacked batch holds more than ``max_members`` members'
batches (see its docstring). Everything else is the real code: ``train_pack``, the pack process,
its protocol and the study loop.

A plug-in model is packed only when its factory declares ``packable = True`` (``pack_blocker``; the
plug-in author's promise that the model is deterministic and stateless, which a pack cannot check
in user code; docs/packs.md, "Plug-in models"). ``memory_limited`` is both and declares it, so the
real ``pack_blocker`` lets it through, in the test process and in the trial processes.
"""

import os
from pathlib import Path

import optuna
import pytest
import torch
from training_specs import make_spec
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.study.loop import split_line
from sassha_tune.training.packs import train_pack
from sassha_tune.training.trainer import train

PLUGIN = "plugins_example:memory_limited"
TESTS = Path(__file__).resolve().parents[1]  # where plugins_example.py is

BASE = dict(dataset="synthetic", dataset_options=dict(n=240, n_test=40, dim=10), model=PLUGIN, batch_size=32,
            epochs=2, max_steps_per_epoch=3, device="cpu", progress=False, schedule="cosine")
SASSHA = [dict(lr=0.05, rho=0.05, lazy_hessian=3, seed=1), dict(lr=0.1, rho=0.1, lazy_hessian=1, seed=2),
          dict(lr=0.02, rho=0.02, lazy_hessian=2, eps=1e-6, seed=3), dict(lr=0.08, rho=0.03, lazy_hessian=1, seed=4)]

@pytest.fixture
def plugins_importable(monkeypatch):
    """The trial processes a study starts import the plug-in too: put this directory on their path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


def _specs(n, max_members):
    return [make_spec(optimizer="sassha", hparams=h, seed=0, **{**BASE, "model_options": {"max_members": max_members}})
            for h in SASSHA[:n]]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


class Recorder:
    """on_epoch / on_leave / on_split calls, to check that nobody is told twice."""

    def __init__(self, n):
        self.epochs = {i: [] for i in range(n)}
        self.left, self.splits = [], []

    def callbacks(self):
        def on_epoch(i):
            def cb(epoch, metrics):
                self.epochs[i].append(epoch)
                return False

            return cb

        return [on_epoch(i) for i in range(len(self.epochs))]

    def leave(self, i, result):
        self.left.append((i, result.status))

    def split(self, epoch, halves):
        self.splits.append((epoch, halves))


def test_emulated_limit_counts_the_members_of_the_stacked_batch():
    assert train(_specs(1, 1)[0]).status == "completed"  # a lone run fits under max_members=1
    assert train(_specs(1, 0)[0]).status == "out_of_memory"


def test_split_in_halves_recursively_and_members_equal_lone_runs():
    # 3 members, at most 1 fits: [0, 1, 2] -> [0, 1] + [2], then [0, 1] -> [0] + [1] (depth first)
    specs = _specs(3, 1)
    rec = Recorder(3)
    results = train_pack(specs, rec.callbacks(), on_leave=rec.leave, split_on_oom=True, on_split=rec.split)
    assert rec.splits == [(1, [[0, 1], [2]]), (1, [[0], [1]])]
    assert sorted(rec.left) == [(0, "completed"), (1, "completed"), (2, "completed")]  # each told once
    assert rec.epochs == {0: [1, 2], 1: [1, 2], 2: [1, 2]}  # epoch 1 reported once, by the retry
    for spec, member in zip(specs, results, strict=True):
        alone = train(spec)  # restarted from scratch: same seed, data order and init as the lone run
        assert member.status == alone.status == "completed" and member.steps == alone.steps == 6
        assert _same(member.model, alone.model)
        for h_pack, h_alone in zip(member.history, alone.history, strict=True):
            assert {**h_pack, "seconds": 0} == {**h_alone, "seconds": 0}


def test_pack_that_fits_is_not_split():
    rec = Recorder(2)
    results = train_pack(_specs(2, 2), rec.callbacks(), on_leave=rec.leave, split_on_oom=True, on_split=rec.split)
    assert rec.splits == [] and [r.status for r in results] == ["completed", "completed"]


def test_out_of_memory_even_alone_fails_that_member_only_once():
    specs = _specs(2, 0)  # not even one member fits
    rec = Recorder(2)
    results = train_pack(specs, rec.callbacks(), on_leave=rec.leave, split_on_oom=True, on_split=rec.split)
    assert rec.splits == [(1, [[0], [1]])]
    assert rec.left == [(0, "out_of_memory"), (1, "out_of_memory")] and rec.epochs == {0: [], 1: []}
    alone = train(specs[0])
    for r in results:  # what the single-trial path gives
        assert (r.status, r.failure_reason, r.epochs_completed) == (alone.status, alone.failure_reason, 0)


def test_default_fails_every_member_without_splitting():
    # split_on_oom=False (a benchmark measuring a pack of K): the whole pack fails, as before
    rec = Recorder(2)
    results = train_pack(_specs(2, 1), rec.callbacks(), on_leave=rec.leave, on_split=rec.split)
    assert rec.splits == [] and [r.status for r in results] == ["out_of_memory", "out_of_memory"]


def test_out_of_memory_after_a_report_is_not_split():
    # An out-of-memory error in epoch 2 (here raised by member 0's epoch-2 callback, i.e. during the
    # pack's epoch-2 bookkeeping): epoch 1 was reported, so a restart would report it twice. The live
    # members fail as out_of_memory and keep the epoch they completed.
    def boom(epoch, metrics):
        if epoch == 2:
            raise torch.OutOfMemoryError("emulated, after epoch 1 was reported")
        return False

    rec = Recorder(2)
    results = train_pack(_specs(2, 2), [boom, rec.callbacks()[1]], on_leave=rec.leave, split_on_oom=True,
                         on_split=rec.split)
    assert rec.splits == []
    # member 0's epoch-2 metrics were recorded before its callback ran, member 1's epoch 2 not yet
    assert [(r.status, r.epochs_completed) for r in results] == [("out_of_memory", 2), ("out_of_memory", 1)]
    assert rec.epochs[1] == [1] and sorted(rec.left) == [(0, "out_of_memory"), (1, "out_of_memory")]


def test_out_of_memory_while_setting_up_is_split():
    # The members' models and optimizer state themselves do not fit (the plug-in's factory refuses
    # more than max_models models before any of them ran): split with epoch 0, and a lone member
    # whose model does not fit fails without stopping the other half.
    def specs(max_models):
        return [make_spec(optimizer="sassha", hparams=h, seed=0,
                          **{**BASE, "model_options": {"max_members": 9, "max_models": max_models}})
                for h in SASSHA[:2]]

    rec = Recorder(2)
    results = train_pack(specs(1), rec.callbacks(), on_leave=rec.leave, split_on_oom=True, on_split=rec.split)
    assert rec.splits == [(0, [[0], [1]])] and [r.status for r in results] == ["completed", "completed"]
    rec = Recorder(2)
    results = train_pack(specs(0), rec.callbacks(), on_leave=rec.leave, split_on_oom=True, on_split=rec.split)
    assert rec.left == [(0, "out_of_memory"), (1, "out_of_memory")]
    with pytest.raises(torch.OutOfMemoryError):  # without split_on_oom: raised, as before
        train_pack(specs(1))


def test_split_line():
    assert split_line(1, [[0, 1, 2, 3], [4, 5, 6, 7]]) == (
        "pack of 8 ran out of memory in epoch 1; retrying as 2 packs of 4 (trials [0, 1, 2, 3] and [4, 5, 6, 7])")
    assert split_line(1, [[3, 4, 5], [6, 7]]).startswith("pack of 5 ran out of memory in epoch 1; retrying as packs of 3 and 2")
    assert "while setting up its members" in split_line(0, [[0], [1]])


# --------------------------------------------------------------------------------------------
# Through the study: sassha-tune run --pack K


def _config(tmp_path, name, max_members, n_trials):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"study: {{name: {name}, objective: val_acc, sampler: {{name: random, seed: 0}}}}\n"
        f"budget: {{n_trials: {n_trials}}}\n"
        "task: {dataset: synthetic, dataset_options: {n: 240, n_test: 40, dim: 10}, "
        f"model: '{PLUGIN}', model_options: {{max_members: {max_members}}}, epochs: 2, batch_size: 32, "
        "max_steps_per_epoch: 3}\n"
        "optimizer: {name: sassha, search_space: sassha, enqueue_published: false}\n"
        "metrics: {subset_size: 64, budget: {lambda_max_iters: 5, trace_probes: 5, sam_steps: 2}}\n"
        "device: cpu\nseed: 0\n"
    )
    return cfg


def _run(cfg, db, pack):
    result = CliRunner().invoke(app, ["run", str(cfg), "--storage", f"sqlite:///{db}", "--pack", str(pack)])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # rich may wrap the long line


def test_cli_pack_out_of_memory_splits_and_trials_equal_lone_runs(plugins_importable, tmp_path):
    from sassha_tune.config import config_from_dict
    from sassha_tune.trial.objective import evaluate_params

    db = tmp_path / "s.db"
    output = _run(_config(tmp_path, "oom", 2, 4), db, 4)
    assert "packs of 4 trials per process" in output
    assert "pack of 4 ran out of memory in epoch 1; retrying as 2 packs of 2 (trials [0, 1] and [2, 3])" in output
    study = optuna.load_study(study_name="oom", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    cfg = config_from_dict(study.user_attrs["config"])
    for t in trials:
        assert (t.user_attrs["pack_size"], t.user_attrs["pack_index"]) == (2, t.number % 2)
        assert t.user_attrs["pack_oom_sizes"] == [4]
        assert len(t.user_attrs["history"]) == 2  # each epoch stored once
        alone = evaluate_params(cfg, t.params, device="cpu")  # the lone run of the same trial
        assert t.values == alone.values
        for key in ("val_loss", "train_loss", "test_acc", "test_loss", "lambda_max", "hessian_trace"):
            assert t.user_attrs[key] == alone.attrs[key], key


def test_cli_pack_out_of_memory_at_one_fails_those_trials_only(plugins_importable, tmp_path):
    # not even a lone trial fits: the pack of 2 is split, each half fails out_of_memory once, and
    # the study goes on (its last trial runs alone, through the single-trial path, with the same result)
    db = tmp_path / "s.db"
    output = _run(_config(tmp_path, "oom1", 0, 3), db, 2)
    assert "pack of 2 ran out of memory in epoch 1; retrying as 2 packs of 1 (trials [0] and [1])" in output
    trials = optuna.load_study(study_name="oom1", storage=f"sqlite:///{db}").get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.FAIL for t in trials)
    assert [t.user_attrs["failure_reason"] for t in trials] == ["out_of_memory"] * 3
    assert [t.user_attrs.get("pack_size") for t in trials] == [1, 1, None]  # trial 2: the single-trial path
    assert [t.user_attrs["epochs_completed"] for t in trials] == [0, 0, 0]
    assert "budget reached (3/3 trials)" in output


def test_out_of_memory_in_a_leaving_members_metrics_fails_it_out_of_memory():
    # on_leave computes a completed member's final metrics (sharpness: Hessian-vector products), which
    # can run out of memory too: that member fails out_of_memory, as it would alone (before, it kept a
    # "completed" result that its trial was never told); the other finished members still get their
    # own attempt at their metrics, as they would alone
    calls = []

    def on_leave(i, result):
        calls.append((i, result.status))
        if (i, result.status) == (0, "completed"):
            raise torch.OutOfMemoryError("emulated: final metrics")

    results = train_pack(_specs(2, 2), on_leave=on_leave, split_on_oom=True)
    assert calls == [(0, "completed"), (0, "out_of_memory"), (1, "completed")]
    assert [r.status for r in results] == ["out_of_memory", "completed"]
