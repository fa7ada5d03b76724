"""Where a study's wall time goes, and what the chance guard saves (issue 19; docs/benchmarks.md).

Runs the quickstart (examples/quickstart.yaml: 8 SASSHA trials of a 1-D CNN on MNIST-1D, CPU)
into a fresh SQLite file, with the chance guard off (``study.chance_guard: 0``, the old
behaviour) and on (``auto``), each with a fresh process per trial (the default) and with one warm
trial worker (the default since issue 19; ``fresh`` runs pass ``fresh_process=True``), one trial at a time (``--pack 1``). For each run: the study's
wall time, the sum of the trials' ``train_seconds`` and ``sharpness_seconds`` (user attributes),
the share of wall time that is neither (process start, imports, dataset and model building,
storage round trips), and the training seconds spent on trials that ended near chance (complete
near chance by the report's rule, or pruned by the guard with ``prune_reason: near_chance``).

    OMP_NUM_THREADS=1 python benchmarks/study_overhead.py [--runs off:fresh,auto:fresh,off:warm,auto:warm] [--out DIR]

The sampler is seeded, but a pruned trial tells TPE less than a complete one, so after the first
guard-pruned trial the two runs sample different trials: compare totals, not trial by trial.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sassha_tune.api import run_study
from sassha_tune.config import load_config
from sassha_tune.report.health import near_chance

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


def _num(value) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def measure(guard: str, workdir: Path, pack: int, warm: bool = False) -> dict:
    cfg = load_config(QUICKSTART)
    cfg.study.chance_guard = 0 if guard == "off" else ("auto" if guard == "auto" else int(guard))
    name = f"overhead-{guard}-{'warm' if warm else 'fresh'}"
    cfg.study.name = name
    cfg.study.storage = f"sqlite:///{workdir / f'{name}.db'}"
    stamped: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    study = run_study(cfg, log=lambda line: stamped.append((time.perf_counter(), line)), pack=pack,
                      fresh_process=not warm)
    wall = time.perf_counter() - t0
    # where "neither" goes: before the first trial starts (validation, the data check, creating the
    # study), inside trials (the parent's "started" line to the trial's told line, less training
    # and sharpness: process or job start, data, model, final evaluation, storage writes), between
    # trials (asking, the sampler, the budget and liveness checks)
    starts = [t for t, line in stamped if " started" in line and line.startswith("trial ")]
    ends = [t for t, line in stamped if line.startswith("trial ") and any(
        f" {state}" in line for state in ("COMPLETE", "PRUNED", "FAIL"))]
    setup = (starts[0] - t0) if starts else wall
    in_trials = sum(e - s for s, e in zip(starts, ends, strict=False))
    trials = [t for t in study.trials if t.state.name != "WAITING"]
    train = sum(_num(t.user_attrs.get("train_seconds")) for t in trials)
    sharp = sum(_num(t.user_attrs.get("sharpness_seconds")) for t in trials)
    chance = [t for t in trials if near_chance(t.state, t.user_attrs) is True
              or t.user_attrs.get("prune_reason") == "near_chance"]
    return {
        "guard": guard,
        "processes": "warm" if warm else "fresh",
        "trials": len(trials),
        "states": {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "wall_seconds": wall,
        "train_seconds": train,
        "sharpness_seconds": sharp,
        "other_seconds": wall - train - sharp,
        "other_share": (wall - train - sharp) / wall,
        "setup_seconds": setup,
        "in_trials_other_seconds": in_trials - train - sharp,
        "between_trials_seconds": wall - setup - in_trials,
        "near_chance_trials": len(chance),
        "near_chance_train_seconds": sum(_num(t.user_attrs.get("train_seconds")) for t in chance),
        "near_chance_epochs": [t.user_attrs.get("epochs_completed") for t in chance],
        "best_val_acc": max((_num(t.user_attrs.get("val_acc")) for t in trials if t.state.name == "COMPLETE"), default=None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="off:fresh,auto:fresh,off:warm,auto:warm",
                    help="comma-separated GUARD:PROCESSES, GUARD off, auto or an epoch count, PROCESSES fresh or warm")
    ap.add_argument("--pack", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write overhead.json there")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs.split(","):
            guard, _, processes = run.strip().partition(":")
            rows.append(measure(guard, Path(tmp), args.pack, warm=processes == "warm"))
            print(json.dumps(rows[-1]))
    print()
    print("| chance guard | processes | trials (complete/pruned/fail) | wall (s) | train (s) | sharpness (s) | neither (s, share) "
          "| near-chance trials | their training (s) | best val_acc |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        st = r["states"]
        print(f"| {r['guard']} | {r['processes']} | {r['trials']} ({st['COMPLETE']}/{st['PRUNED']}/{st['FAIL']}) | {r['wall_seconds']:.1f} "
              f"| {r['train_seconds']:.1f} | {r['sharpness_seconds']:.1f} | {r['other_seconds']:.1f} "
              f"({100 * r['other_share']:.0f} %) | {r['near_chance_trials']} | {r['near_chance_train_seconds']:.1f} "
              f"| {r['best_val_acc']:.3f} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
