"""Data parallelism on torch.distributed (CPU, gloo, 2 ranks): a 2-rank run on batch halves follows
the 1-process trajectory on whole batches (SASSHA-LM step by step through its perturbed phase, with
gradient accumulation); a killed rank fails the trial quickly with a reason; a study trial with
``device.processes: 2`` completes and reports once."""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from sassha_tune import distributed
from sassha_tune.optim import SAMSGD, SGD, AdaHessian, MSassha, Sassha, SasshaLM, SophiaH
from sassha_tune.optim.sassha_lm import linear_weight_groups
from sassha_tune.trial.ranks import free_port

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS, BATCH, DIM, CLASSES = 20, 32, 8, 3
RANKS = 2
CASES = {
    "sgd": lambda ps, m: SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "sam_global": lambda ps, m: SAMSGD(ps, lr=0.1, momentum=0.9, rho=0.1, model=m, perturbation_grad="global"),
    "sam_local": lambda ps, m: SAMSGD(ps, lr=0.1, momentum=0.9, rho=0.1, model=m),
    "sassha_global": lambda ps, m: Sassha(ps, lr=0.05, rho=0.1, lazy_hessian=3, model=m, perturbation_grad="global"),
    "sassha_local": lambda ps, m: Sassha(ps, lr=0.05, rho=0.1, lazy_hessian=3, model=m),
    "msassha": lambda ps, m: MSassha(ps, lr=0.05, rho=0.1, lazy_hessian=3),
    "adahessian": lambda ps, m: AdaHessian(ps, lr=0.05, lazy_hessian=3),
    "sophiah": lambda ps, m: SophiaH(ps, lr=0.05, lazy_hessian=3),
    "sassha_lm_sum": lambda ps, m: SasshaLM(ps, lr=0.05, rho=0.1, lazy_hessian=3, rho_warmup_iters=4, model=m),
    "sassha_lm_mean": lambda ps, m: SasshaLM(ps, lr=0.05, rho=0.1, lazy_hessian=3, rho_warmup_iters=4, model=m,
                                             grad_reduce="mean"),
}


def _problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, DIM, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (STEPS, BATCH), generator=g)
    return x, y


def _run(name: str, rank: int = 0, world: int = 1):
    """Final parameters (one flat vector) and optimizer state after STEPS steps on this rank's slices."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, CLASSES)).double()
    opt = CASES[name](model.parameters(), model)
    x, y = _problem()
    for t in range(STEPS):
        xb, yb = x[t].tensor_split(world)[rank], y[t].tensor_split(world)[rank]
        opt.step(lambda xb=xb, yb=yb: F.cross_entropy(model(xb), yb))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    sd = opt.state_dict()
    extra = sd.get("hessian_preconditioned", {})
    return flat, extra.get("generator_state")


# SASSHA-LM, iteration by iteration: rho warm-up for iterations 0-4 (one pass), perturbed from 5 on;
# refreshes at 0, 3, 6, ... (in pass 1 during the warm-up, in pass 2 after); alpha 1 -> 0.8 after 7;
# two micro-batches per rank; decayed and not-decayed groups; the clip to 0.5 acts on most steps
LM_STEPS, LM_MICRO = 16, 2
LM_KW = dict(lr=0.05, rho=0.1, lazy_hessian=3, rho_warmup_iters=4, hessian_warmup_iters=7, max_grad_norm=0.5)


def _lm_trajectory(reduce: str, rank: int = 0, world: int = 1, scale: float = 1.0) -> torch.Tensor:
    """The parameters after every step (one row per step) of SASSHA-LM with ``grad_reduce=reduce``.

    On ``world`` ranks, rank r takes slice r of each global batch and splits it into LM_MICRO
    micro-batches; in one process (``world=1``) micro-batch j is the union of the ranks' micro-batches
    j, so both runs see the same global batch and the same micro-batch structure. ``scale``
    multiplies the loss (x world in one process reproduces a sum over ranks exactly: powers of two).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, CLASSES)).double()
    opt = SasshaLM(linear_weight_groups(model, 0.01), model=model, grad_reduce=reduce, **LM_KW)
    x, y = _problem()
    rows = []
    for t in range(LM_STEPS):
        if world > 1:
            xs, ys = x[t].tensor_split(world)[rank].tensor_split(LM_MICRO), y[t].tensor_split(world)[rank].tensor_split(LM_MICRO)
        else:  # micro-batch j of the whole batch = every rank's micro-batch j
            xs = [torch.cat([h.tensor_split(LM_MICRO)[j] for h in x[t].tensor_split(RANKS)]) for j in range(LM_MICRO)]
            ys = [torch.cat([h.tensor_split(LM_MICRO)[j] for h in y[t].tensor_split(RANKS)]) for j in range(LM_MICRO)]
        opt.step([lambda xb=xb, yb=yb: scale * F.cross_entropy(model(xb), yb) for xb, yb in zip(xs, ys, strict=True)])
        rows.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return torch.stack(rows)


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        results: dict = {name: _run(name, rank, world) for name in CASES}
        results["lm_trajectory"] = {reduce: _lm_trajectory(reduce, rank, world) for reduce in ("mean", "sum")}
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("ddp") / "final")
    mp.spawn(_rank_main, args=(RANKS, free_port(), out), nprocs=RANKS, join=True)
    return [torch.load(f"{out}.{r}") for r in range(RANKS)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["sgd", "sam_global", "sassha_global", "msassha", "adahessian", "sophiah"])
def test_two_ranks_follow_one_process(two_rank_results, name):
    single, _ = _run(name)
    for rank in range(2):
        final, _ = two_rank_results[rank][name]
        assert _rel(final, single) < 1e-5, (name, rank, _rel(final, single))
    # optimizer state is the same on every rank, the probe generator included: rank 0's checkpoint is everyone's
    (a, gen_a), (b, gen_b) = two_rank_results[0][name], two_rank_results[1][name]
    assert torch.equal(a, b)
    if gen_a is not None:
        assert torch.equal(gen_a, gen_b)


@pytest.mark.parametrize("name", ["sam", "sassha"])
def test_local_perturbation_differs_as_documented(two_rank_results, name):
    """``perturbation_grad="local"`` (the reference's behaviour) perturbs each rank by its own half's
    gradient: not the 1-process trajectory, but still identical parameters on every rank."""
    single, _ = _run(f"{name}_global")
    local0, _ = two_rank_results[0][f"{name}_local"]
    local1, _ = two_rank_results[1][f"{name}_local"]
    assert torch.equal(local0, local1)
    assert _rel(local0, single) > 1e-4


# Tolerance of the SASSHA-LM comparison: the two runs differ only in the rounding of the loss and
# gradient sums (half batches then an all-reduce vs the whole batch), about 1e-16 relative per step
# in float64, growing slowly over the steps (measured: at most 2.6e-15 over these 16 steps, mean and
# sum, on one x86 CPU). 1e-11 leaves over three orders of magnitude for other CPUs' rounding and is
# still eight below what a wrong perturbation costs: with each rank perturbing by its own half's
# gradient the runs part by 3e-3 at the first perturbed iteration (5), about 1e-2 later (measured).
LM_RTOL = 1e-11


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_language_model_variant_follows_one_process_through_the_perturbed_phase(two_rank_results, reduce):
    """SASSHA-LM on 2 ranks follows the 1-process run on the same global batch at every iteration,
    through the rho warm-up and the perturbed iterations after it: the official loop reduces the
    pass-1 gradient across ranks before clipping and perturbing, so every rank perturbs like one
    process on the whole batch. With ``grad_reduce="sum"`` (the official default) the ranks' sum is
    the 1-process run on the loss x 2. Every rank holds the same parameters bit for bit."""
    single = _lm_trajectory(reduce, scale=RANKS if reduce == "sum" else 1.0)
    ranks = [two_rank_results[r]["lm_trajectory"][reduce] for r in range(RANKS)]
    assert torch.equal(ranks[0], ranks[1])
    rel = [_rel(ranks[0][t], single[t]) for t in range(LM_STEPS)]
    assert LM_STEPS - 1 > LM_KW["rho_warmup_iters"] + LM_KW["lazy_hessian"]  # perturbed refreshes included
    assert max(rel) < LM_RTOL, [f"{t}: {r:.1e}" for t, r in enumerate(rel)]
    print(f"\nSASSHA-LM, 2 ranks vs 1 process ({reduce}): max relative L2 difference {max(rel):.1e}")


def test_language_model_variant_sums_or_averages_and_keeps_ranks_identical(two_rank_results):
    """SASSHA-LM sums (its default) or averages the ranks' gradients and estimates: every rank ends
    with the same parameters, and the two reductions are two trajectories."""
    for name in ("sassha_lm_sum", "sassha_lm_mean"):
        (a, gen_a), (b, gen_b) = two_rank_results[0][name], two_rank_results[1][name]
        assert torch.equal(a, b) and torch.equal(gen_a, gen_b), name
    summed, averaged = two_rank_results[0]["sassha_lm_sum"][0], two_rank_results[0]["sassha_lm_mean"][0]
    assert _rel(summed, averaged) > 1e-4  # sum = 2x the mean gradient here: another trajectory


def test_single_process_is_untouched():
    """No process group: the optimizers never touch torch.distributed collectives."""
    assert not dist.is_initialized()
    assert distributed.active_group() is None
    t = [torch.ones(3)]
    distributed.all_reduce_mean(t)
    assert torch.equal(t[0], torch.ones(3))


# ------------------------------------------------------------------------------------------------
# Through the trainer, the objective and a study
# ------------------------------------------------------------------------------------------------


def _config(tmp_path, **device):
    d = {
        "study": {"name": "ddp", "objective": "val_acc", "pruner": {"name": "median"}},
        "budget": {"n_trials": 1},
        "task": {"dataset": "mnist1d", "model": "mlp", "epochs": 1, "batch_size": 64, "max_steps_per_epoch": 4},
        "optimizer": {"name": "sassha", "search_space": {"params": {"lr": {"type": "float", "low": 0.05, "high": 0.2}}},
                      "fixed": {"rho": 0.05, "lazy_hessian": 2}},
        "metrics": {"subset_size": 64, "budget": {"lambda_max_iters": 3, "trace_probes": 2, "sam_steps": 1}},
        "device": {"name": "cpu", "processes": 2, **device},
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _rank_pid(rank: int) -> int:
    for pid in _children(os.getpid()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"RANK") == str(rank).encode():
            return pid
    raise AssertionError(f"no rank {rank} process")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank process through /proc")
def test_killed_rank_fails_the_trial_quickly(tmp_path):
    from sassha_tune.config import load_config
    from sassha_tune.trial.objective import evaluate_params

    cfg = load_config(_config(tmp_path))
    cfg.task.epochs, cfg.task.max_steps_per_epoch = 50, None  # far longer than the test waits
    killed: list[float] = []

    def on_epoch(epoch: int, metrics: dict) -> bool:
        if not killed:
            os.kill(_rank_pid(1), signal.SIGKILL)
            killed.append(time.monotonic())
        return False

    outcome = evaluate_params(cfg, {}, on_epoch=on_epoch)
    waited = time.monotonic() - killed[0]
    assert outcome.state == "fail"
    assert outcome.failure_reason == "rank_failed: rank 1 killed by SIGKILL"
    assert waited < 30, waited
    print(f"\nkilled rank -> trial failed in {waited:.2f} s")


def test_study_trial_with_two_processes_reports_once(tmp_path, monkeypatch):
    import optuna
    from optuna.trial import TrialState

    from sassha_tune.config import load_config
    from sassha_tune.study.create import create_or_continue
    from sassha_tune.study.loop import run_trials
    from sassha_tune.study.progress import StudyObserver

    class Seen(StudyObserver):
        def __init__(self) -> None:
            self.events: list[tuple] = []

        def epoch(self, number, epoch, metrics):
            self.events.append(("epoch", number, epoch))

        def phase(self, number, name):
            self.events.append(("phase", number, name))

        def step(self, number, epoch, step, steps):
            self.events.append(("step", number, step))

    import sassha_tune.study.loop as loop

    monkeypatch.setattr(loop, "STEP_SECONDS", 0.0)  # every step but the epoch's last is told
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = load_config(_config(tmp_path))
    create_or_continue(cfg, url, log=lambda _m: None)
    seen = Seen()
    run_trials("ddp", url, log=lambda _m: None, observer=seen)
    # rank 0's, relayed by the rank launcher
    assert seen.events == [("step", 0, 1), ("step", 0, 2), ("step", 0, 3), ("epoch", 0, 1), ("phase", 0, "sharpness")]
    (trial,) = optuna.load_study(study_name="ddp", storage=url).get_trials()
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("failure_reason")
    assert trial.user_attrs["processes"] == 2
    assert trial.intermediate_values.keys() == {1}  # rank 0 alone reported the epoch
    assert len(trial.user_attrs["history"]) == 1
    assert trial.user_attrs["lambda_max"] is not None  # sharpness measured (once, on rank 0)
