"""Trial packs: a member follows the lone run's trajectory (sassha_tune.training.packs)."""

import sqlite3

import pytest
import torch
from training_specs import make_spec
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.study.pack_size import choose_pack_size
from sassha_tune.training.packs import pack_blocker, train_pack
from sassha_tune.training.trainer import train

MLP = dict(dataset="synthetic", dataset_options=dict(n=640, n_test=64, dim=20), model="mlp",
           model_options=dict(hidden=[32, 32]), batch_size=64, epochs=5, device="cpu", progress=False,
           schedule="cosine")  # 9 steps/epoch (val split 10%): 45 steps
BN_CNN = dict(dataset="synthetic", dataset_options=dict(n=320, n_test=32, shape=[3, 8, 8]), model="resnet8",
              model_options=dict(width=4), batch_size=32, epochs=5, device="cpu", progress=False,
              schedule="cosine", max_steps_per_epoch=10)  # 9 steps/epoch (val split): 45 steps

HPARAMS = {
    "sgd": [dict(lr=0.05, weight_decay=5e-4), dict(lr=0.1, momentum=0.5), dict(lr=0.02, momentum=0.0)],
    "sam_sgd": [dict(lr=0.05, rho=0.05), dict(lr=0.1, rho=0.2, weight_decay=5e-4), dict(lr=0.02, rho=0.01)],
    # different k: refresh steps where any member refreshes, only those members' v updated
    "sassha": [dict(lr=0.05, rho=0.05, lazy_hessian=3, seed=1),
               dict(lr=0.1, rho=0.1, lazy_hessian=1, weight_decay=1e-3, seed=2),
               dict(lr=0.02, rho=0.02, lazy_hessian=7, dense_refresh_steps=5, eps=1e-6, seed=3)],
}


def max_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """max over parameter and buffer tensors of ||a - b|| / ||b||"""
    worst = 0.0
    for (_, x), (_, y) in zip([*a.named_parameters(), *a.named_buffers()], [*b.named_parameters(), *b.named_buffers()],
                              strict=True):
        x, y = x.detach().double(), y.detach().double()
        worst = max(worst, float((x - y).norm() / y.norm().clamp_min(1e-30)))
    return worst


def _compare(base: dict, optimizer: str, kernels: str | None, tol: float, steps: int = 45) -> list[float]:
    specs = [make_spec(optimizer=optimizer, hparams=h, seed=s, **base) for s, h in zip((0, 1, 2), HPARAMS[optimizer],
                                                                                      strict=True)]
    packed = train_pack(specs, kernels=kernels)
    diffs = []
    for spec, member in zip(specs, packed, strict=True):
        alone = train(spec)
        assert member.status == alone.status == "completed"
        assert member.steps == alone.steps == steps
        diffs.append(max_rel_diff(member.model, alone.model))
        assert diffs[-1] <= tol, (optimizer, kernels, diffs)
        for h_pack, h_alone in zip(member.history, alone.history, strict=True):
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                assert h_pack[key] == pytest.approx(h_alone[key], rel=1e-5, abs=1e-6), key
    return diffs


@pytest.mark.parametrize("optimizer", ["sgd", "sam_sgd", "sassha"])
def test_member_follows_lone_run_mlp(optimizer):
    _compare(MLP, optimizer, "exact", 1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "sam_sgd"])
def test_member_follows_lone_run_mlp_batched_kernels(optimizer):
    _compare(MLP, optimizer, "batched", 1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "sam_sgd"])
def test_member_follows_lone_run_bn_cnn_exact_kernels(optimizer):
    # kernels="exact": convolutions/BN member by member (the lone run's kernels): bitwise here
    assert max(_compare(BN_CNN, optimizer, "exact", 1e-5)) == 0.0


def test_sassha_bn_cnn_first_steps_exact_kernels():
    # SASSHA on a BN ResNet: the first steps, refreshes included (k = 1, 3, 7: all refresh at step 1).
    # Under vmap the double backward sums the contributions at a residual connection in another
    # order than the lone run (HVPs differ by ~1e-7, amplified to 1e-4 after one step); exact
    # kernels run the lone graph per member and are bitwise equal.
    base = {**BN_CNN, "epochs": 1, "max_steps_per_epoch": 3}
    specs = [make_spec(optimizer="sassha", hparams=h, seed=s, **base) for s, h in zip((0, 1, 2), HPARAMS["sassha"],
                                                                                     strict=True)]
    for spec, member in zip(specs, train_pack(specs, kernels="exact"), strict=True):
        assert max_rel_diff(member.model, train(spec).model) <= 1e-5


def test_sassha_member_follows_lone_run_bn_cnn_50_steps_default_kernels():
    # the kernels studies use (train_pack's default: "exact" for SASSHA); 10 steps/epoch, 50 steps,
    # refresh steps every 3, 1 and 7 steps; hessian_point="reference" (the hybrid point)
    base = {**BN_CNN, "dataset_options": {**BN_CNN["dataset_options"], "n": 360}}
    assert max(_compare(base, "sassha", None, 1e-5, steps=50)) == 0.0


def test_diverged_member_leaves_and_others_continue_identically():
    specs = [make_spec(optimizer="sgd", hparams=dict(lr=lr), seed=s, **MLP) for s, lr in ((0, 0.05), (1, 1e6), (2, 0.02))]
    left = []
    packed = train_pack(specs, on_leave=lambda i, r: left.append((i, r.status)))
    assert packed[1].status == "diverged" and packed[1].failure_reason == "diverged"
    assert left[0] == (1, "diverged") and sorted(left) == [(0, "completed"), (1, "diverged"), (2, "completed")]
    alone_pack = train_pack([specs[0], specs[2]])  # the same members without the diverging one
    for i, j in ((0, 0), (2, 1)):
        assert packed[i].status == "completed"
        assert max_rel_diff(packed[i].model, alone_pack[j].model) == 0.0
        assert max_rel_diff(packed[i].model, train(specs[i]).model) <= 1e-5


def test_pruned_member_leaves():
    specs = [make_spec(optimizer="sassha", hparams=dict(lr=0.05, rho=0.05, lazy_hessian=2), seed=s, **MLP) for s in (0, 1)]
    packed = train_pack(specs, on_epoch=[lambda e, m: e >= 2, None])
    assert packed[0].status == "stopped" and packed[0].epochs_completed == 2
    assert packed[1].status == "completed" and packed[1].epochs_completed == 5
    assert max_rel_diff(packed[1].model, train(specs[1]).model) <= 1e-5


def test_cannot_pack():
    assert pack_blocker("mlp") is None  # every optimizer packs (exact kernels where there is no batched step)
    assert pack_blocker("pkg.mod:factory") is not None
    assert pack_blocker("vit", {"dropout": 0.1}) is not None
    assert pack_blocker("resnet20") is None
    with pytest.raises(ValueError, match="differ in 'batch_size'"):
        train_pack([make_spec(**{**MLP, "batch_size": 32}), make_spec(**MLP)])


def test_plugin_is_packed_only_when_its_factory_declares_it():
    # memory_limited declares `packable = True`; tiny_linear does not; a missing module cannot say
    assert pack_blocker("plugins_example:memory_limited") is None
    assert pack_blocker("plugins_example:memory_limited", {"max_members": 4}) is None
    assert "is a plug-in" in pack_blocker("plugins_example:tiny_linear")
    assert "is a plug-in" in pack_blocker("plugins_example:no_such_factory")
    assert "is a plug-in" in pack_blocker("no_such_module_here:build")
    # the other checks still apply to a packable plug-in
    assert "dropout" in pack_blocker("plugins_example:memory_limited", {"dropout": 0.1})


def test_pack_size_choice():
    from sassha_tune.config import config_from_dict

    raw = {"study": {"name": "x", "objective": "val_acc"}, "budget": {"n_trials": 4},
           "task": {"dataset": "mnist1d", "model": "cnn1d", "epochs": 1},
           "optimizer": {"name": "sassha", "search_space": "sassha"}, "device": "cpu"}
    cfg = config_from_dict(raw)
    assert choose_pack_size(cfg, "auto", device="cpu", budget_left=4)[0] == 1
    assert choose_pack_size(cfg, 3, device="cpu", budget_left=4)[0] == 3
    # --pack auto on a GPU sizes members by this estimate (it imported a module that does not exist)
    from sassha_tune.study.pack_size import _member_bytes

    assert _member_bytes(cfg) > 64 * 40 * 600 * 4
    raw["optimizer"] = {"name": "adahessian", "search_space": "adahessian"}  # exact kernels: packs too
    assert choose_pack_size(config_from_dict(raw), 3, device="cpu", budget_left=4)[0] == 3
    raw["task"] = {**raw["task"], "model": "vit", "model_options": {"dropout": 0.1}}
    size, why = choose_pack_size(config_from_dict(raw), 3, device="cpu", budget_left=4)
    assert size == 1 and "cannot pack (the model uses dropout" in why
    raw["task"]["model_options"] = {}
    raw["device"] = {"name": "cpu", "processes": 2}
    size, why = choose_pack_size(config_from_dict(raw), 3, device="cpu", budget_left=4)
    assert size == 1 and "runs as 2 processes" in why


@pytest.mark.parametrize(("optimizer", "hparams"), [
    ("adahessian", [dict(lr=0.05, lazy_hessian=2), dict(lr=0.02, lazy_hessian=3)]),
    ("sophiah", [dict(lr=0.01, lazy_hessian=2), dict(lr=0.02, lazy_hessian=1)]),
])
def test_optimizers_without_a_batched_step_pack_with_exact_kernels(optimizer, hparams):
    specs = [make_spec(optimizer=optimizer, hparams=h, seed=s, **{**MLP, "epochs": 2}) for s, h in enumerate(hparams)]
    with pytest.raises(ValueError, match="has no batched step"):
        train_pack(specs, kernels="batched")
    for spec, member in zip(specs, train_pack(specs), strict=True):
        assert max_rel_diff(member.model, train(spec).model) == 0.0  # each member steps alone: bitwise


def test_cli_run_with_pack_stores_ordinary_trials(tmp_path):
    cfg = tmp_path / "pack.yaml"
    cfg.write_text(
        "study: {name: packs, objective: val_acc, sampler: {name: random, seed: 0}, pruner: none}\n"
        "budget: {n_trials: 3}\n"
        "task: {dataset: mnist1d, model: cnn1d, epochs: 2, batch_size: 128, max_steps_per_epoch: 4}\n"
        "optimizer: {name: sassha, search_space: sassha, enqueue_published: false}\n"
        "metrics: {subset_size: 64, budget: {lambda_max_iters: 5, trace_probes: 5, sam_steps: 2}}\n"
        "device: cpu\nseed: 0\n"
    )
    db = tmp_path / "s.db"
    result = CliRunner().invoke(app, ["run", str(cfg), "--storage", f"sqlite:///{db}", "--pack", "3"])
    assert result.exit_code == 0, result.output
    assert "packs of 3 trials" in result.output
    import optuna

    study = optuna.load_study(study_name="packs", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:
        assert t.user_attrs["pack_size"] == 3
        for key in ("val_acc", "test_acc", "lambda_max", "hessian_trace", "epochs_completed", "history"):
            assert t.user_attrs.get(key) is not None, key
        assert len(t.user_attrs["history"]) == 2
    sqlite3.connect(db).close()


def test_language_model_pack_members_equal_their_lone_runs(tmp_path):
    # SASSHA-LM with gradient accumulation on token windows: exact kernels, each member its lone run
    import random

    rng = random.Random(3)
    words = "the a cat dog sat on mat ran fast and".split()
    (tmp_path / "t.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)), encoding="utf-8")
    base = dict(dataset="text", data_dir=str(tmp_path), dataset_options={"block_size": 12}, model="gpt",
                model_options=dict(n_layer=1, n_head=2, n_embd=16), epochs=2, batch_size=8, max_steps_per_epoch=4,
                accumulation=2, device="cpu", progress=False, schedule="cosine", optimizer="sassha_lm")
    hps = [dict(lr=0.05, rho=0.05, lazy_hessian=2, rho_warmup_iters=2, seed=1),
           dict(lr=0.1, rho=0.02, lazy_hessian=3, rho_warmup_iters=1, weight_decay=1e-3, seed=2)]
    specs = [make_spec(hparams=h, seed=s, **base) for s, h in enumerate(hps)]
    for spec, member in zip(specs, train_pack(specs), strict=True):
        alone = train(spec)
        assert max_rel_diff(member.model, alone.model) == 0.0
        assert [h["val_ppl"] for h in member.history] == [h["val_ppl"] for h in alone.history]
