"""Tuning efficiency: how much training a search spends before it finds a good SASSHA configuration
(issue 24; results in docs/benchmarks.md, "Tuning efficiency").

Every study here is a real sassha-tune study (``sassha_tune.run_study``: trial processes, the
sampler, the pruner, the chance guard, enqueued configurations, SQLite), of SASSHA on a small CPU
task whose trials take seconds. Studies of one task share the data split and the initialization
seed (``seed: 0``) and differ only in what their search proposes: the strategy and the sampler's
seed (the study seed).

**Cost** is counted in *run-equivalents*: the epochs trained by all trials so far (a pruned or
failed trial counts what it trained, to the step: ``epochs_trained``) divided by the epochs of one
full run. It does not depend on the machine. Sharpness is not measured (``metrics.sharpness:
false``): it costs the same for every strategy and is not part of the search.

**Target** per task: 98 % of the best validation accuracy a large reference search found
(``reference`` below; ``targets.json`` records how). A study reaches the target when a *complete*
trial (the configuration it would select) has at least that validation accuracy; the cost to
target is the run-equivalents spent when that trial ended. A study that never reaches it within
the budget counts as infinite (medians are taken with that).

Commands (``--help`` on each)::

    OMP_NUM_THREADS=1 python benchmarks/tuning_efficiency.py reference --tasks bn,nonorm,noise
    OMP_NUM_THREADS=1 python benchmarks/tuning_efficiency.py run --strategies plain,random,defaults --seeds 0-4
    python benchmarks/tuning_efficiency.py analyze --out docs/results/tuning_efficiency

Studies go to one SQLite file per study under ``--workdir`` (default ``tuning-efficiency/``, in
the working directory), so that a run can be interrupted and continued, and ``analyze`` reads them all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGETS_FILE = HERE / "tuning_efficiency_targets.json"
EPOCHS = 10
TARGET_FRACTION = 0.98
BUDGET = 16.0  # run-equivalents per study
REACH_BUDGET = 8.0  # the goal: reach the target within this many run-equivalents
CHUNK = 4  # trials added to a study's budget at a time, until it has spent BUDGET

# --------------------------------------------------------------------------------------------
# tasks: each small enough that a SASSHA trial takes seconds on one CPU core

_COMMON = {"epochs": EPOCHS, "batch_size": 64, "val_fraction": 0.25}  # 1000 validation examples: 2 % is 20

TASKS: dict[str, dict[str, Any]] = {
    "bn": {
        "about": "MNIST-1D, a 1-D CNN with BatchNorm after every convolution (plug-in "
                 "benchmarks/tuning_models.py:cnn1d_bn)",
        "normalized": True,
        "task": {"dataset": "mnist1d", "model": "tuning_models:cnn1d_bn", **_COMMON},
    },
    "nonorm": {
        "about": "MNIST-1D, the built-in MLP (two hidden layers of 256, no normalization)",
        "normalized": False,
        "task": {"dataset": "mnist1d", "model": "mlp", **_COMMON},
    },
    "noise": {
        "about": "MNIST-1D with 30 % of the training labels flipped, the built-in 1-D CNN (no normalization)",
        "normalized": False,
        "task": {"dataset": "mnist1d", "model": "cnn1d", "label_noise": 0.3, **_COMMON},
    },
}

# Fresh tasks, run after the defaults were chosen on the three above (a check, not a tuning set):
# scikit-learn's digits (8x8 images, 1437 training and validation images, 360 test).
FRESH_TASKS: dict[str, dict[str, Any]] = {
    "digits_bn": {
        "about": "scikit-learn digits, the built-in ResNet-8 (BatchNorm), width 8",
        "normalized": True,
        "task": {"dataset": "digits", "model": "resnet8", "model_options": {"width": 8}, **_COMMON},
    },
    "digits_mlp": {
        "about": "scikit-learn digits, the built-in MLP (two hidden layers of 256, no normalization)",
        "normalized": False,
        "task": {"dataset": "digits", "model": "mlp", **_COMMON},
    },
}
TASKS.update(FRESH_TASKS)


def shipped_space(task: str) -> str:
    """The shipped space a user who read the docs picks for this model: ``sassha`` for a
    normalized network, ``sassha_nonorm`` for one without normalization."""
    return "sassha" if TASKS[task]["normalized"] else "sassha_nonorm"


# --------------------------------------------------------------------------------------------
# strategies: what a study sets on top of the task; "defaults" sets nothing

def _plain(task: str) -> dict[str, Any]:
    """What a user of plain Optuna writes: TPE with its defaults, every trial to the end, no chance
    guard, nothing enqueued, the shipped space for the model."""
    return {"study": {"sampler": {"name": "tpe", "options": {}}, "pruner": "none", "chance_guard": 0,
                      "diverged_as_pruned": False},
            "optimizer": {"search_space": shipped_space(task), "enqueue_published": False}}


def _with(base: Callable[[str], dict[str, Any]], **study: Any) -> Callable[[str], dict[str, Any]]:
    def strategy(task: str) -> dict[str, Any]:
        out = base(task)
        out["study"] = {**out["study"], **study}
        return out
    return strategy


STRATEGIES: dict[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    "plain": ("plain Optuna: TPE defaults (10 random start-up trials), no pruning, no guard, nothing "
              "enqueued, the shipped space for the model", _plain),
    "random": ("random search, otherwise as plain", _with(_plain, sampler={"name": "random"})),
    "tpe_hyperband": ("TPE + Hyperband over epochs (min 1 epoch, reduction 3), otherwise as plain",
                      _with(_plain, pruner={"name": "hyperband", "options": {"min_resource": 1,
                                                                             "reduction_factor": 3}})),
    "defaults": ("sassha-tune's defaults: only the task, the optimizer's name and the objective are given",
                 lambda task: {}),
}


# The levers one at a time on top of plain, written with explicit config keys (so that the rows keep
# their meaning whatever the defaults are).
PRIOR = {  # where the search starts (see docs/benchmarks.md for where each came from)
    True: ["cifar10/resnet32/sassha.sh", "imagenet/resnet50/sassha.sh"],  # published, BatchNorm ResNets
}
SAFE_NONORM = [  # docs/optimizer.md "Dense start and eps": trains on cnn1d and cnn at lr 0.1 and 0.3
    {"source": "safe-lr0.1", "lr": 0.1, "rho": 0.1, "lazy_hessian": 10, "eps": 1.0e-4, "weight_decay": 1.0e-4,
     "dense_refresh_steps": 50},
    {"source": "safe-lr0.3", "lr": 0.3, "rho": 0.1, "lazy_hessian": 10, "eps": 1.0e-4, "weight_decay": 1.0e-4,
     "dense_refresh_steps": 50},
]


def _with_prior(base: Callable[[str], dict[str, Any]]) -> Callable[[str], dict[str, Any]]:
    def strategy(task: str) -> dict[str, Any]:
        out = base(task)
        if TASKS[task]["normalized"]:
            out["optimizer"] = {**out["optimizer"], "enqueue_published": PRIOR[True]}
        else:
            import yaml

            space = yaml.safe_load((HERE.parent / "search_spaces" / "sassha_nonorm.yaml").read_text())
            out["optimizer"] = {**out["optimizer"], "enqueue_published": True,
                                "search_space": {"optimizer": "sassha", "params": space["params"],
                                                 "published": SAFE_NONORM}}
        return out
    return strategy


SH = {"name": "successive_halving", "options": {"min_resource": 1, "reduction_factor": 3}}
SMALL_TPE = {"name": "tpe", "options": {"n_startup_trials": 4, "multivariate": True}}

STRATEGIES.update({
    "before": ("sassha-tune's defaults before issue 24, written out: TPE defaults, no pruner, the chance "
               "guard, nothing enqueued, the optimizer's own space whatever the model",
               lambda task: {"study": {"sampler": {"name": "tpe", "options": {}}, "pruner": "none",
                                       "chance_guard": "auto", "diverged_as_pruned": False},
                             "optimizer": {"search_space": "sassha", "enqueue_published": False}}),
    "prior": ("plain + the prior enqueued first (two published configurations on a BatchNorm net, two "
              "safe ones without normalization)", _with_prior(_plain)),
    "sh": ("plain + successive halving over epochs (min 1 epoch, reduction 3)", _with(_plain, pruner=SH)),
    "tpe4": ("plain + TPE with 4 random start-up trials, multivariate", _with(_plain, sampler=SMALL_TPE)),
    "guard": ("plain + the chance guard (auto)", _with(_plain, chance_guard="auto")),
    "prior_sh": ("prior + successive halving", _with(_with_prior(_plain), pruner=SH)),
    "prior_sh_tpe4": ("prior + successive halving + TPE (4 start-up, multivariate) + guard",
                      _with(_with_prior(_plain), pruner=SH, sampler=SMALL_TPE, chance_guard="auto")),
})


# The defaults less one lever at a time: what each lever buys within them.
STRATEGIES.update({
    "defaults-prior": ("the defaults without the prior (enqueue_published: false)",
                       lambda task: {"optimizer": {"enqueue_published": False}}),
    "defaults-pruner": ("the defaults without successive halving (pruner: none)",
                        lambda task: {"study": {"pruner": "none"}}),
    "defaults-sampler": ("the defaults with Optuna's TPE defaults (10 random start-up trials) instead of auto",
                         lambda task: {"study": {"sampler": {"name": "tpe"}}}),
    "defaults-space": ("the defaults in the optimizer's own space whatever the model (search_space: sassha), "
                       "diverged trials told FAIL", lambda task: {"optimizer": {"search_space": "sassha"},
                                                                   "study": {"diverged_as_pruned": False}}),
    "defaults-diverged": ("the defaults in the optimizer's own space whatever the model, diverged trials told "
                          "PRUNED (what failures as evidence buy where trials diverge)",
                          lambda task: {"optimizer": {"search_space": "sassha"}}),
})


def register(name: str, about: str, overrides: Callable[[str], dict[str, Any]]) -> None:
    """Add a strategy (ablations add theirs here)."""
    STRATEGIES[name] = (about, overrides)


# --------------------------------------------------------------------------------------------
# configs and studies

def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def study_name(task: str, strategy: str, seed: int) -> str:
    return f"te-{task}-{strategy}-s{seed}"


def study_config(task: str, strategy: str, seed: int) -> dict[str, Any]:
    base = {
        "study": {"name": study_name(task, strategy, seed), "objective": "val_acc",
                  "sampler": {"seed": seed}},
        "budget": {"n_trials": CHUNK},
        "task": dict(TASKS[task]["task"]),
        "optimizer": {"name": "sassha"},
        "schedule": {"name": "cosine"},
        "metrics": {"sharpness": False},
        "device": "cpu",
        "seed": 0,
    }
    return _merge(base, STRATEGIES[strategy][1](task))


def storage_url(workdir: Path, name: str) -> str:
    return f"sqlite:///{workdir / (name + '.db')}"


def trial_cost(trial: Any) -> float:
    """Run-equivalents one finished trial spent (``epochs_trained``, else its completed epochs)."""
    attrs = trial.user_attrs
    epochs = attrs.get("epochs_trained", attrs.get("epochs_completed", 0)) or 0
    return float(epochs) / EPOCHS


def spent(study: Any) -> float:
    return sum(trial_cost(t) for t in study.trials if t.state.is_finished())


def run_one(task: str, strategy: str, seed: int, workdir: str, budget: float) -> dict[str, Any]:
    """Run (or continue) one study until it has spent ``budget`` run-equivalents."""
    import logging

    import optuna

    from sassha_tune.app.api import run_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("sassha_tune").setLevel(logging.WARNING)
    name = study_name(task, strategy, seed)
    url = storage_url(Path(workdir), name)
    cfg = study_config(task, strategy, seed)
    t0 = time.time()
    n = CHUNK
    try:
        existing = optuna.load_study(study_name=name, storage=url)
        n = len(existing.trials)
        if spent(existing) >= budget:
            return {"study": name, "trials": n, "spent": spent(existing), "seconds": 0.0}
        n += CHUNK
    except Exception:  # noqa: BLE001 - a new study
        pass
    while True:
        study = run_study(cfg, storage=url, n_trials=n, log=lambda _line: None)
        if spent(study) >= budget:
            break
        n = len(study.trials) + CHUNK
    return {"study": name, "trials": len(study.trials), "spent": spent(study), "seconds": time.time() - t0}


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def _environment() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # the benchmark's model plug-in, in this process and in every trial process
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(HERE))


def run_many(jobs: Sequence[tuple[str, str, int]], workdir: Path, budget: float, parallel: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(run_one, t, s, seed, str(workdir), budget): (t, s, seed) for t, s, seed in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            r = future.result()
            print(f"[{done}/{len(jobs)}] {r['study']}: {r['trials']} trials, {r['spent']:.2f} run-eq, "
                  f"{r['seconds']:.0f} s", flush=True)


# --------------------------------------------------------------------------------------------
# reference search and targets

REFERENCE_STRATEGIES = {
    "ref_tpe": ("TPE, 20 random start-up trials, multivariate, every trial to the end", {
        "study": {"sampler": {"name": "tpe", "options": {"n_startup_trials": 20, "multivariate": True}},
                  "pruner": "none", "chance_guard": 0}}),
    "ref_random": ("random search, every trial to the end", {
        "study": {"sampler": {"name": "random"}, "pruner": "none", "chance_guard": 0}}),
}


def reference(tasks: Sequence[str], workdir: Path, trials: int, parallel: int) -> None:
    """A large search per task (``trials`` full runs of TPE and as many of random search, in the
    shipped space for the model, plus the space's published configurations), and the target."""
    for name, (about, over) in REFERENCE_STRATEGIES.items():
        register(name, about, lambda task, over=over: _merge(
            over, {"optimizer": {"search_space": shipped_space(task), "enqueue_published": True}}))
    run_many([(t, s, 1000) for t in tasks for s in REFERENCE_STRATEGIES], workdir, float(trials), parallel)
    import optuna

    targets = json.loads(TARGETS_FILE.read_text()) if TARGETS_FILE.exists() else {}
    for task in tasks:
        best, where = -math.inf, None
        n = 0
        for strategy in REFERENCE_STRATEGIES:
            name = study_name(task, strategy, 1000)
            study = optuna.load_study(study_name=name, storage=storage_url(workdir, name))
            for t in study.trials:
                n += t.state.is_finished()
                if t.state.name == "COMPLETE" and t.value is not None and t.value > best:
                    best, where = t.value, f"{name} trial {t.number}: {t.params}"
        targets[task] = {
            "best_val_acc": best, "target": TARGET_FRACTION * best, "found_by": where,
            "how": f"{n} full-length trials in the space {shipped_space(task)} (its published configurations "
                   f"first): TPE (20 random start-up trials, multivariate) and random search, "
                   f"{trials:g} run-equivalents each, sampler seed 1000",
            "about": TASKS[task]["about"],
        }
        print(f"{task}: best val_acc {best:.4f} ({where}); target {TARGET_FRACTION * best:.4f}")
    TARGETS_FILE.write_text(json.dumps(targets, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# analysis

def study_curve(study: Any) -> dict[str, Any]:
    """The study's trials in order: cumulative cost and the selected configuration after each."""
    from sassha_tune.study.budget import outcome  # the tool's own split (status, report)

    points = []
    cost = 0.0
    best = None
    finished = sorted((t for t in study.trials if t.state.is_finished()), key=lambda t: t.number)
    for t in finished:
        cost += trial_cost(t)
        if t.state.name == "COMPLETE" and t.value is not None and (best is None or t.value > best.value):
            best = t
        points.append({"cost": cost, "best_val": None if best is None else best.value,
                       "best_test": None if best is None else best.user_attrs.get("test_acc"),
                       "outcome": outcome(t.state, t.user_attrs)})
    return {"points": points}


def cost_to_target(points: list[dict[str, Any]], target: float, budget: float) -> float:
    for p in points:
        if p["cost"] > budget + 1e-9:
            break
        if p["best_val"] is not None and p["best_val"] >= target:
            return p["cost"]
    return math.inf


def at_budget(points: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    inside = [p for p in points if p["cost"] <= budget + 1e-9]
    return inside[-1] if inside else {"best_val": None, "best_test": None}


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    v = sorted(values)
    if not v:
        return math.nan, math.nan
    def q(p: float) -> float:
        k = (len(v) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        if v[lo] == v[hi] or math.isinf(v[lo]) or math.isinf(v[hi]):
            return v[lo] if k - lo < 0.5 else v[hi]
        return v[lo] + (v[hi] - v[lo]) * (k - lo)
    return q(0.25), q(0.75)


def _fmt(x: float) -> str:
    return "never" if math.isinf(x) else ("-" if math.isnan(x) else f"{x:.1f}")


def analyze(workdir: Path, out: Path | None, strategies: Sequence[str] | None, budget: float,
            fraction: float | None = None, curves_file: Path | None = None,
            seeds: Sequence[int] | None = None, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Tables (and with ``out``, the anytime plots and ``curves.json``, every study's curve) of
    every study in ``workdir``, or of the curves in ``curves_file`` (an earlier ``curves.json``);
    ``fraction``: the target as this fraction of the reference's best instead of the recorded
    98 % (a sensitivity check, never the headline); ``seeds``: only these study seeds (an ablation
    compared with the defaults on the same seeds)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    targets = json.loads(TARGETS_FILE.read_text())
    if fraction is not None:
        targets = {t: {**v, "target": fraction * v["best_val_acc"]} for t, v in targets.items()}
    if tasks:
        targets = {t: v for t, v in targets.items() if t in tasks}
    results: dict[str, Any] = {}
    if curves_file is not None:  # the curves an earlier analyze kept (docs/results/...): no studies needed
        for task, by_strategy in json.loads(curves_file.read_text()).items():
            for strategy, by_seed in by_strategy.items():
                if task in targets and (not strategies or strategy in strategies):
                    results.setdefault(task, {})[strategy] = {
                        int(s): c for s, c in by_seed.items() if not seeds or int(s) in seeds}
    for db in sorted(workdir.glob("te-*.db")) if curves_file is None else []:
        name = db.stem
        _, rest = name.split("-", 1)
        task, rest = rest.split("-", 1)
        strategy, seed = rest.rsplit("-s", 1)
        if (task not in targets or (strategies and strategy not in strategies) or int(seed) >= 1000
                or (seeds and int(seed) not in seeds)):
            continue
        url = storage_url(workdir, name)
        names = optuna.get_all_study_names(url)  # one study per file (the file may have been renamed)
        if len(names) != 1:
            continue
        study = optuna.load_study(study_name=names[0], storage=url)
        curve = study_curve(study)
        results.setdefault(task, {}).setdefault(strategy, {})[int(seed)] = curve
    summary: dict[str, Any] = {}
    lines = []
    for task, by_strategy in results.items():
        target = targets[task]["target"]
        lines.append(f"\n### {task}: {targets[task]['about']}\n")
        share = target / targets[task]["best_val_acc"]
        lines.append(f"Target: val_acc >= {target:.4f} ({share:.0%} of {targets[task]['best_val_acc']:.4f}).\n")
        lines.append("| strategy | studies | run-eq to target: median [IQR] | reached within "
                     f"{REACH_BUDGET:g} | within {budget:g} | best val_acc at {budget:g}: median | selected config's "
                     "test_acc: median | trials: median | per study (median): diverged / near chance / pruned |")
        lines.append("|---|---:|---|---:|---:|---:|---:|---:|---|")
        summary[task] = {}
        for strategy in sorted(by_strategy, key=lambda s: list(STRATEGIES).index(s) if s in STRATEGIES else 99):
            curves = by_strategy[strategy]
            costs = [cost_to_target(c["points"], target, budget) for c in curves.values()]
            finals = [at_budget(c["points"], budget) for c in curves.values()]
            vals = [f["best_val"] for f in finals if f["best_val"] is not None]
            tests = [f["best_test"] for f in finals if f["best_test"] is not None]
            inside = [[p for p in c["points"] if p["cost"] <= budget + 1e-9] for c in curves.values()]
            n_trials = [len(p) for p in inside]
            div = [sum(p["outcome"] == "diverged" for p in ps) for ps in inside]
            chance = [sum(p["outcome"] == "near_chance" for p in ps) for ps in inside]
            pruned = [sum(p["outcome"] == "pruned" for p in ps) for ps in inside]
            lo, hi = _quartiles(costs)
            med = _median(costs)
            summary[task][strategy] = {
                "studies": len(costs), "costs": costs, "median_cost": med,
                "reached_within_reach_budget": sum(c <= REACH_BUDGET for c in costs),
                "reached_within_budget": sum(c <= budget for c in costs),
                "median_best_val": _median(vals), "median_test_of_selected": _median(tests),
            }
            lines.append(
                f"| {strategy} | {len(costs)} | {_fmt(med)} [{_fmt(lo)}, {_fmt(hi)}] | "
                f"{sum(c <= REACH_BUDGET for c in costs)}/{len(costs)} | {sum(c <= budget for c in costs)}/{len(costs)} | "
                f"{_median(vals):.4f} | {_median(tests):.4f} | {_median(n_trials):.0f} | "
                f"{_median(div):.0f} / {_median(chance):.0f} / {_median(pruned):.0f} |")
    lines += goal_lines(summary)
    lines += lever_lines(summary)
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tables.md").write_text(text + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        # every study's curve, so that the tables and plots can be redrawn without the studies
        (out / "curves.json").write_text(json.dumps(results, separators=(",", ":")) + "\n")
        _anytime_plots(results, targets, out, budget)
    return summary


def goal_lines(summary: dict[str, Any], ours: str = "defaults", baseline: str = "plain") -> list[str]:
    """The issue's goal, task by task: ``ours`` reaches the target in at most a third of
    ``baseline``'s median run-equivalents (a fifth at the median over tasks), in at least 9 of 10
    studies within :data:`REACH_BUDGET`, and its final best is no worse than ``baseline``'s."""
    rows, ratios = [], []
    for task, by in summary.items():
        if ours not in by or baseline not in by:
            continue
        a, b = by[ours], by[baseline]
        ratio = b["median_cost"] / a["median_cost"] if a["median_cost"] > 0 else math.nan
        ratios.append(ratio)
        shown = ("inf (plain never reaches it)" if math.isinf(b["median_cost"]) and math.isfinite(a["median_cost"])
                 else "- (neither reaches it)" if math.isinf(a["median_cost"]) and math.isinf(b["median_cost"])
                 else f"{ratio:.1f}x")
        rows.append(f"| {task} | {_fmt(b['median_cost'])} | {_fmt(a['median_cost'])} | {shown} | "
                    f"{a['reached_within_reach_budget']}/{a['studies']} | {a['median_best_val']:.4f} vs "
                    f"{b['median_best_val']:.4f} | {a['median_test_of_selected']:.4f} vs "
                    f"{b['median_test_of_selected']:.4f} |")
    if not rows:
        return []
    finite = [r for r in ratios if not math.isnan(r)]
    left_out = [task for task, r in zip([t for t in summary if ours in summary[t] and baseline in summary[t]],
                                        ratios, strict=True) if math.isnan(r)]
    head = [f"\n### The goal: {ours} against {baseline}\n",
            f"| task | {baseline}: median run-eq to target | {ours} | ratio (goal >= 3x) | {ours} within "
            f"{REACH_BUDGET:g} run-eq (goal >= 9 of 10) | best val_acc at the budget, {ours} vs {baseline} | "
            f"selected config's test_acc, {ours} vs {baseline} |",
            "|---|---:|---:|---:|---:|---|---|"]
    tail = [f"\nMedian ratio over tasks: {_fmt(statistics.median(finite)) if finite else '-'}x (goal >= 5x)"
            + (f"; left out, where neither reaches the target: {', '.join(left_out)}." if left_out else ".")]
    return head + rows + tail


def lever_lines(summary: dict[str, Any], ours: str = "defaults") -> list[str]:
    """The ablation: ``ours`` and each ``ours-<lever>`` strategy (the defaults less that lever),
    per task the median run-equivalents to the target (studies reaching it) and the median best
    validation accuracy within the budget."""
    levers = sorted({s for by in summary.values() for s in by if s.startswith(ours + "-")},
                    key=lambda s: list(STRATEGIES).index(s) if s in STRATEGIES else 99)
    if not levers:
        return []
    tasks = [t for t in summary if ours in summary[t]]
    head = ["\n### What each lever buys: the defaults less one lever\n",
            "| strategy | " + " | ".join(f"{t}: run-eq to target (reached) / best val_acc" for t in tasks) + " |",
            "|---|" + "---|" * len(tasks)]
    rows = []
    for strategy in [ours, *levers]:
        cells = []
        for t in tasks:
            r = summary[t].get(strategy)
            cells.append("-" if r is None else f"{_fmt(r['median_cost'])} ({r['reached_within_budget']}/{r['studies']})"
                                               f" / {r['median_best_val']:.4f}")
        rows.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return head + rows


def _anytime_plots(results: dict[str, Any], targets: dict[str, Any], out: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    grid = np.linspace(0, budget, 161)
    for task, by_strategy in results.items():
        fig = Figure(figsize=(7, 4.2))
        ax = fig.add_subplot()
        for i, (strategy, curves) in enumerate(by_strategy.items()):
            rows = []
            for c in curves.values():
                ys = np.full_like(grid, np.nan)
                for p in c["points"]:
                    if p["best_val"] is not None:
                        ys[grid >= p["cost"]] = p["best_val"]
                rows.append(ys)
            arr = np.array(rows)
            with np.errstate(all="ignore"):
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    lo, med, hi = np.nanpercentile(np.where(np.isnan(arr), 0.0, arr), [25, 50, 75], axis=0)
            color = f"C{i}"
            ax.plot(grid, med, color=color, label=f"{strategy} ({len(rows)} studies)", drawstyle="steps-post")
            ax.fill_between(grid, lo, hi, color=color, alpha=0.15, step="post")
        ax.axhline(targets[task]["target"], color="k", linestyle="--", linewidth=0.8, label="target")
        ax.set_xlabel("training spent (run-equivalents)")
        ax.set_ylabel("best validation accuracy so far")
        best = targets[task]["best_val_acc"]
        found = max((p["best_val"] for curves in by_strategy.values() for c in curves.values()
                     for p in c["points"] if p["best_val"] is not None), default=best)
        ax.set_ylim(max(0.0, best - 0.25), max(best, found) + 0.01)  # a study may beat the reference
        ax.set_title(f"{task}: median and 25-75 % band over study seeds")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / f"anytime_{task}.png", dpi=110)


# --------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_ref = sub.add_parser("reference", help="the large reference search per task, and its target")
    p_ref.add_argument("--tasks", default=",".join(TASKS))
    p_ref.add_argument("--trials", type=int, default=60, help="full runs per reference strategy")
    p_run = sub.add_parser("run", help="run (or continue) the strategies' studies")
    p_run.add_argument("--tasks", default=",".join(TASKS))
    p_run.add_argument("--strategies", default="plain,random,tpe_hyperband,defaults")
    p_run.add_argument("--seeds", default="0-4")
    p_run.add_argument("--budget", type=float, default=BUDGET, help="run-equivalents per study")
    p_an = sub.add_parser("analyze", help="tables and anytime plots from the stored studies")
    p_an.add_argument("--strategies", default="")
    p_an.add_argument("--budget", type=float, default=BUDGET)
    p_an.add_argument("--out", type=Path, default=None)
    p_an.add_argument("--fraction", type=float, default=None,
                      help="the target as this fraction of the best (a sensitivity check; default: 0.98, recorded)")
    p_an.add_argument("--curves", type=Path, default=None,
                      help="read the curves an earlier analyze wrote (curves.json) instead of the studies")
    p_an.add_argument("--seeds", default="", help="only these study seeds, e.g. 0-1 (default: all)")
    p_an.add_argument("--tasks", default="", help="only these tasks, e.g. bn,nonorm,noise (default: all)")
    for p in (p_ref, p_run, p_an):
        p.add_argument("--workdir", type=Path, default=Path("tuning-efficiency"))
        p.add_argument("--parallel", type=int, default=2, help="studies at once (one core each)")
    args = parser.parse_args(argv)
    _environment()
    if args.command == "reference":
        reference(args.tasks.split(","), args.workdir, args.trials, args.parallel)
    elif args.command == "run":
        jobs = [(t, s, seed) for seed in _seeds(args.seeds) for t in args.tasks.split(",")
                for s in args.strategies.split(",")]
        unknown = {s for _, s, _ in jobs} - set(STRATEGIES)
        if unknown:
            parser.error(f"unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
        run_many(jobs, args.workdir, args.budget, args.parallel)
    else:
        analyze(args.workdir, args.out, [s for s in args.strategies.split(",") if s], args.budget, args.fraction,
                args.curves, _seeds(args.seeds) if args.seeds else None, [t for t in args.tasks.split(",") if t])


if __name__ == "__main__":
    main()
