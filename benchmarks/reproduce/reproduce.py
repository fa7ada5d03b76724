"""Reproduce the SASSHA paper's claims on data we have (issue 8): one part end to end.

    python benchmarks/reproduce/reproduce.py --part mnist1d --storage sqlite:///reproduce.db
    python benchmarks/reproduce/reproduce.py --part mnist1d_noise40 --storage sqlite:///reproduce_noise.db
    python benchmarks/reproduce/reproduce.py --part fashion --storage sqlite:///reproduce-gpu.db --time-limit 600
    python benchmarks/reproduce/reproduce.py --part noise40 --storage sqlite:///reproduce-gpu.db --time-limit 600

A part is a folder of configs next to this file (``mnist1d``, ``mnist1d_noise40`` (CPU,
40 % label noise), ``mnist1d_dense`` and ``mnist1d_noise40_dense`` (CPU: SASSHA with the
``sassha_nonorm`` space; in ``mnist1d_dense`` also AdaHessian with the same dense Hessian
start), ``fashion_cnn`` (CPU: Fashion-MNIST with a plain CNN, the fresh-task check of
``sassha_nonorm``), ``fashion``, ``noise20``,
``noise40``, ``noise60``; ``--part noise`` means the three noise levels in turn). For every
config, in order:

1. tuning study: ``sassha-tune run CONFIG --storage URL`` (creates the study or continues it;
   lost trials are retried, the budget counts trials already there);
2. seed re-runs of the study's best configuration (selected on val_acc) with training seeds
   1, 2, 3 (seed 0 is the seed the search selected on, so it is not re-used): ``sassha-tune
   rerun STUDY --seeds 1,2,3 --trial N``, which runs them as trials of the companion study
   ``<study>-seeds`` (user attributes ``seed_rerun_of``: the best trial's number, and ``seed``)
   through the study loop, crash-safe and resumable; ``sassha-tune compare`` reads them as seed
   re-runs (a companion stored by earlier versions of this script is adopted);
3. when every study and re-run is done: ``sassha-tune compare`` into ``docs/results/<part>`` and
   the results table ``docs/results/<part>/table.md`` (also printed).

Everything is resumable: re-running the same command continues unfinished studies and runs only
the missing seeds. ``--time-limit SECONDS`` makes one invocation a bounded *piece* (for a GPU
lease): no new study run or re-run starts once it could not finish in time (GPU configs set
``budget.timeout`` so that one ``sassha-tune run`` starts no new trial after a few minutes);
run the same command again to continue. Without it, the part runs to the end.

Paths in configs and outputs are relative to the repository root; run from there.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

HERE = Path(__file__).resolve().parent
ORDER = ["sgd", "adamw", "sam_sgd", "sam_adamw", "adahessian", "sophiah", "sassha", "msassha"]
SEEDS = (1, 2, 3)
PARTS = {"noise": ["noise20", "noise40", "noise60"]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def configs(part: str) -> list[tuple[str, Path, dict]]:
    folder = HERE / part
    if not folder.is_dir():
        sys.exit(f"no part {part!r} (expected the folder {os.path.relpath(folder)})")
    out = []
    for path in folder.glob("*.yaml"):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        out.append((raw["optimizer"]["name"], path, raw))
    out.sort(key=lambda t: ORDER.index(t[0]) if t[0] in ORDER else len(ORDER))
    return out


def sassha_tune(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # SASSHA_TUNE_CMD: how to call the CLI where the entry point is not installed,
    # e.g. "python -m sassha_tune.app.cli" with PYTHONPATH=. on a machine without pip
    cmd = [*os.environ.get("SASSHA_TUNE_CMD", "sassha-tune").split(), *args]
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=check)


def budget_used(study: optuna.Study) -> int:
    """Trials that count toward the budget (docs/config.md): not lost / interrupted / over_budget."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        reason = str(t.user_attrs.get("failure_reason") or "")
        if t.state == optuna.trial.TrialState.FAIL and reason in ("lost", "interrupted", "over_budget"):
            continue
        if t.state == optuna.trial.TrialState.WAITING:
            continue
        n += 1
    return n


def load(name: str, storage: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("seed_rerun_of") is None]
    if not done:
        return None
    return sorted(done, key=lambda t: (-float(t.user_attrs.get("val_acc", t.values[0])), t.number))[0]


def rerun(name: str, storage: str, number: int) -> int:
    """Re-run trial ``number`` of study ``name`` with the training seeds :data:`SEEDS` (``sassha-tune
    rerun``: trials of the companion study ``<name>-seeds``, run by the study loop; only the seeds
    without a re-run run). Returns the command's exit code."""
    seeds = ",".join(map(str, SEEDS))
    return sassha_tune("rerun", name, "--seeds", seeds, "--trial", str(number), "--storage", storage,
                       check=False).returncode


def _counted(t: optuna.trial.FrozenTrial) -> bool:
    """A finished re-run that counts (docs/config.md): not lost, interrupted or over budget."""
    if t.state == optuna.trial.TrialState.FAIL:
        return str(t.user_attrs.get("failure_reason") or "") not in ("lost", "interrupted", "over_budget")
    return t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def seeds_done(name: str, storage: str, number: int | None = None) -> set[int]:
    """Seeds already re-run for trial ``number`` of study ``name`` (default: its best trial)."""
    s = load(name + "-seeds", storage)
    if s is None:
        return set()
    if number is None:
        best = best_trial(load(name, storage))
        number = best.number if best else -1
    return {int(t.user_attrs["seed"]) for t in s.get_trials(deepcopy=False)
            if "seed" in t.user_attrs and t.user_attrs.get("seed_rerun_of") == number and _counted(t)}


# ----------------------------------------------------------------------------------------------
# the table


def _f(values: list[float]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]


def mean_std(values: list, scale: float = 1.0, digits: int = 2) -> str:
    v = [x * scale for x in _f(values)]
    if not v:
        return "-"
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_g(values: list) -> str:
    v = _f(values)
    if not v:
        return "-"
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return f"{m:.3g} ± {s:.2g}"


def search_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    fin = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=fin) if t.user_attrs.get("seed_rerun_of") is None]


def trial_seconds(t: optuna.trial.FrozenTrial) -> float:
    s = t.user_attrs.get("train_seconds")
    if isinstance(s, (int, float)) and math.isfinite(s):
        return float(s)
    if t.datetime_start and t.datetime_complete:
        return (t.datetime_complete - t.datetime_start).total_seconds()
    return 0.0


def best_within(trials: list[optuna.trial.FrozenTrial], seconds: float) -> float:
    """Best val_acc among the trials (in order) whose cumulative train-seconds fit in ``seconds``."""
    best, spent = -math.inf, 0.0
    for t in sorted(trials, key=lambda t: t.number):
        spent += trial_seconds(t)
        if spent > seconds + 1e-9:
            break
        if t.state == optuna.trial.TrialState.COMPLETE:
            best = max(best, float(t.user_attrs.get("val_acc", t.values[0])))
    return best


def table(part: str, storage: str) -> str:
    rows, studies = [], []
    for opt, _path, raw in configs(part):
        s = load(raw["study"]["name"], storage)
        space = raw["optimizer"].get("search_space")
        label = opt if space in (None, opt) else f"{opt} ({space})"  # a part may compare two spaces
        if s is not None:
            studies.append((label, s))
    if not studies:
        return f"no studies of part {part} in the storage yet\n"
    totals = {opt: sum(trial_seconds(t) for t in search_trials(s)) for opt, s in studies}
    equal = min(totals.values())
    cheapest = min(totals, key=totals.get)
    for opt, s in studies:
        trials = search_trials(s)
        best = best_trial(s)
        seeds = load(s.study_name + "-seeds", storage)
        # only the re-runs of the selected config (supplementary re-runs of other trials are left out)
        re = [t for t in seeds.get_trials(deepcopy=False)
              if best is not None and t.user_attrs.get("seed_rerun_of") == best.number] if seeds else []
        done = [t for t in re if t.state == optuna.trial.TrialState.COMPLETE]
        def a(k: str, done: list = done) -> list:
            return [t.user_attrs.get(k) for t in done]

        n_c = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        n_f = sum(t.state == optuna.trial.TrialState.FAIL for t in trials)
        n_p = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
        per_trial = totals[opt] / len(trials) if trials else math.nan
        rerun_s = sum(trial_seconds(t) for t in re)
        eq = best_within(trials, equal)
        rows.append([
            opt, f"{len(trials)} ({n_c}/{n_f}/{n_p})",
            f"{100 * float(best.user_attrs['val_acc']):.2f}" if best else "-",
            f"{100 * float(best.user_attrs['test_acc']):.2f}" if best and best.user_attrs.get("test_acc") is not None else "-",
            f"{len(done)}/{len(re)}" if re else "0",
            mean_std(a("val_acc"), 100), mean_std(a("test_acc"), 100), mean_std(a("gen_gap_acc"), 100),
            fmt_g(a("lambda_max")), fmt_g(a("hessian_trace")),
            mean_std(a("ms_per_step"), 1.0, 1),
            f"{per_trial:.1f}", f"{totals[opt]:.0f}", f"{rerun_s:.0f}",
            f"{100 * eq:.2f}" if math.isfinite(eq) else "-",
        ])
    head = ["optimizer", "trials (ok/fail/pruned)", "best val % (seed 0)", "its test %", "re-runs ok",
            "val % (seeds 1-3)", "test % (seeds 1-3)", "gen gap % (seeds 1-3)", "lambda_max (seeds 1-3)",
            "trace (seeds 1-3)", "ms/step", "train-s/trial", "train-s search", "train-s re-runs",
            f"best val % within {equal:.0f} s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"\nmean ± sample std over the re-runs of each study's best config (selected on val_acc) with "
            f"training seeds 1-3; gen gap = train acc - val acc (positive = overfitting); the last column "
            f"is the best val accuracy each search had reached within {equal:.0f} train-seconds, the whole "
            f"search budget of the cheapest study ({cheapest}), i.e. an equal-seconds comparison.\n")
    return "\n".join(out) + "\n" + note


# ----------------------------------------------------------------------------------------------


def run_part(part: str, storage: str, time_limit: float | None, t0: float, out_root: Path) -> bool:
    """Run one part; False when it stopped early because of --time-limit."""

    def left() -> float:
        return math.inf if time_limit is None else time_limit - (time.time() - t0)

    cfgs = configs(part)
    for _opt, path, raw in cfgs:
        name, n = raw["study"]["name"], int(raw["budget"]["n_trials"])
        timeout = raw["budget"].get("timeout") or 0
        for _attempt in range(100):  # GPU configs stop each `run` after budget.timeout; continue
            s = load(name, storage)
            if s is not None and budget_used(s) >= n and not any(
                    t.state == optuna.trial.TrialState.RUNNING for t in s.get_trials(deepcopy=False)):
                break
            if left() < timeout + 120:
                log(f"time limit: not starting {name}; re-run the same command to continue")
                return False
            proc = sassha_tune("run", os.path.relpath(path), "--storage", storage, check=False)
            if proc.returncode not in (0,):
                log(f"{name}: sassha-tune run exited {proc.returncode}")
                if proc.returncode in (2, 130):
                    raise SystemExit(proc.returncode)
    for _opt, _path, raw in cfgs:
        name = raw["study"]["name"]
        s = load(name, storage)
        if best_trial(s) is None:
            log(f"{name}: no complete trial; no re-runs")
            continue
        best = best_trial(s)
        for _attempt in range(100):  # GPU configs stop each `rerun` after budget.timeout; continue
            if set(SEEDS) <= seeds_done(name, storage, best.number):
                break
            # a re-run costs about one search trial; stop when that may not fit
            mean_s = sum(trial_seconds(t) for t in search_trials(s)) / max(1, len(search_trials(s)))
            if left() < 2 * mean_s + 60:
                log(f"time limit: not starting the seed re-runs of {name}; re-run the same command")
                return False
            code = rerun(name, storage, best.number)
            if code:
                log(f"{name}: sassha-tune rerun exited {code}")
                if code in (2, 130):
                    raise SystemExit(code)
    out = out_root / part
    out.mkdir(parents=True, exist_ok=True)
    names = [raw["study"]["name"] for _, _, raw in cfgs]
    sassha_tune("compare", *names, "--storage", storage, "--out", str(out), check=False)
    text = f"# {part}: results table\n\nstorage: `{storage}`\n\n" + table(part, storage)
    (out / "table.md").write_text(text, encoding="utf-8")
    print(text)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", required=True, help="mnist1d, mnist1d_noise40, mnist1d_dense, mnist1d_noise40_dense, fashion_cnn, fashion, noise (= noise20, noise40, noise60) or one noise level")
    ap.add_argument("--storage", default="sqlite:///reproduce.db", help="SQLAlchemy URL (default sqlite:///reproduce.db)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds for this invocation (a piece); re-run the command to continue")
    ap.add_argument("--out", default="docs/results", help="folder for compare reports and tables (default docs/results)")
    ap.add_argument("--table-only", action="store_true", help="only print the table of what is stored")
    ap.add_argument("--rerun-trial", action="append", default=[], metavar="STUDY:N",
                    help="supplementary: also re-run trial N of STUDY over the seeds (stored with seed_rerun_of=N)")
    args = ap.parse_args()
    if args.part.startswith("mnist1d") and os.environ.get("OMP_NUM_THREADS") is None:
        os.environ["OMP_NUM_THREADS"] = "1"  # CPU part: one thread per trial (shared 2-core machines)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parts = PARTS.get(args.part, [args.part])
    t0 = time.time()
    for spec in args.rerun_trial:
        name, _, number = spec.rpartition(":")
        if load(name, args.storage) is None:
            sys.exit(f"--rerun-trial {spec}: no study {name!r}")
        if set(SEEDS) - seeds_done(name, args.storage, int(number)) and rerun(name, args.storage, int(number)) in (2, 130):
            sys.exit(f"--rerun-trial {spec}: sassha-tune rerun failed")
    for part in parts:
        if args.table_only:
            print(table(part, args.storage))
            continue
        if not run_part(part, args.storage, args.time_limit, t0, Path(args.out)):
            log("stopped early (time limit); run the same command again to continue")
            return 3
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
