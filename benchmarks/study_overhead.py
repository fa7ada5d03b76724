"""Where a study's wall time goes, and what the chance guard saves (issue 19; docs/benchmarks.md).

Runs the quickstart (examples/quickstart.yaml: 8 SASSHA trials of a 1-D CNN on MNIST-1D, CPU)
into a fresh SQLite file, with the chance guard off (``study.chance_guard: 0``, the old
behaviour) and on (``auto``), each with a fresh process per trial (the default before issue 19)
and with one warm trial worker (the default since issue 19; ``fresh`` runs pass
``fresh_process=True``), one trial at a time (``--pack 1``). For each run: the study's
wall time, the sum of the trials' ``train_seconds`` and ``sharpness_seconds`` (user attributes),
the share of wall time that is neither (process start, imports, dataset and model building,
storage round trips), and the training seconds spent on trials that ended near chance (complete
near chance by the report's rule, or pruned by the guard with ``prune_reason: near_chance``).

    OMP_NUM_THREADS=1 python benchmarks/study_overhead.py [--runs off:fresh,auto:fresh,off:warm,auto:warm] [--out DIR]

``--cli`` measures what a user sees instead (issue 27): ``sassha-tune run quickstart.yaml`` as a
subprocess from a temporary folder holding a copy of the quickstart (its storage, the relative
``sqlite:///sassha-tune.db``, lands there), its output piped (plain lines, no live view). It
reports the command's wall time and CPU time (user + sys of the command and the processes it
waited for: its trial worker), the trials' training and sharpness seconds read from the stored
study, the share that is neither, and where that goes: to the first output line, to the first
``trial 0 started`` line, inside trials, between them, and after the last trial is told until
the command has exited; also the CPU time the command and its trial worker had used when the
``trial 0 started`` line came (from /proc). ``--command`` runs another ``sassha-tune`` (e.g.
``python -m sassha_tune`` of another checkout, through PYTHONPATH) to compare before and after;
``--create-only`` runs ``run --create-only`` (the coordinator's own start, validation, data check,
study creation and exit, without a trial worker):

    OMP_NUM_THREADS=1 python benchmarks/study_overhead.py --cli [--repeat N] [--command "sassha-tune"] [--create-only] [--set KEY=VALUE ...]

The sampler is seeded, but a pruned trial tells TPE less than a complete one, so after the first
guard-pruned trial the two runs sample different trials: compare totals, not trial by trial.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from sassha_tune.app.api import run_study
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


def _is_told(line: str) -> bool:
    return line.startswith("trial ") and any(f" {state}" in line for state in ("COMPLETE", "PRUNED", "FAIL"))


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + sys) a running process and its live children (the trial worker) have
    used so far, from /proc (Linux; 0.0 where it cannot be read)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for p in [pid, *map(int, children)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tick  # utime stime cutime cstime
    return total


def measure_cli(workdir: Path, command: list[str], env: dict[str, str] | None = None, create_only: bool = False,
                overrides: list[str] | None = None) -> dict:
    """``command run quickstart.yaml`` from ``workdir`` (a fresh copy of the quickstart there), as a
    user runs it from a shell: wall and CPU time of the command, the stored trials' training and
    sharpness seconds, and where the rest goes (by the time each output line arrived). ``overrides``:
    ``--set`` values given to the command (e.g. a longer study)."""
    import optuna

    workdir.mkdir(parents=True)
    shutil.copy(QUICKSTART, workdir / "quickstart.yaml")
    stamped: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    extra = (["--create-only"] if create_only else []) + [a for o in overrides or () for a in ("--set", o)]
    proc = subprocess.Popen([*command, "run", "quickstart.yaml", *extra], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    cpu_to_first_trial = None
    for line in proc.stdout:
        stamped.append((time.perf_counter(), line.rstrip("\n")))
        if cpu_to_first_trial is None and line.startswith("trial ") and " started" in line:
            cpu_to_first_trial = _tree_cpu(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)  # the command's rusage, with the children it waited for
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit("\n".join(line for _, line in stamped) + f"\nexit code {proc.returncode}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{workdir / 'sassha-tune.db'}")
    trials = [t for t in study.trials if t.state.name != "WAITING"]
    train = sum(_num(t.user_attrs.get("train_seconds")) for t in trials)
    sharp = sum(_num(t.user_attrs.get("sharpness_seconds")) for t in trials)
    starts = [t for t, line in stamped if line.startswith("trial ") and " started" in line]
    ends = [t for t, line in stamped if _is_told(line)]
    in_trials = sum(e - s for s, e in zip(starts, ends, strict=False))
    first_trial = (starts[0] - t0) if starts else wall
    after_last = (t0 + wall - ends[-1]) if ends else 0.0
    return {
        "command": shlex.join(command),
        "trials": len(trials),
        "states": {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "wall_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "cpu_user_seconds": usage.ru_utime,
        "cpu_sys_seconds": usage.ru_stime,
        "train_seconds": train,
        "sharpness_seconds": sharp,
        "other_seconds": wall - train - sharp,
        "other_share": (wall - train - sharp) / wall,
        "cpu_to_first_trial_seconds": cpu_to_first_trial,
        "first_line_seconds": (stamped[0][0] - t0) if stamped else wall,
        "first_trial_seconds": first_trial,
        "in_trials_other_seconds": in_trials - train - sharp,
        "between_trials_seconds": wall - first_trial - in_trials - after_last,
        "after_last_trial_seconds": after_last,
        "best_val_acc": max((_num(t.user_attrs.get("val_acc")) for t in trials if t.state.name == "COMPLETE"),
                            default=None),
        "values": [t.values for t in trials],
    }


def main_cli(args: argparse.Namespace) -> None:
    command = shlex.split(args.command)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            rows.append(measure_cli(Path(tmp) / f"run{i}", command, create_only=args.create_only, overrides=args.set))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "values"}))
    print()
    print("| command | trials (complete/pruned/fail) | wall (s) | CPU user+sys (s) | train (s) | sharpness (s) "
          "| neither (s, share) | first line / first trial (s) | CPU to the first trial (s) | in trials / between / after the last (s) | best val_acc |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        st = r["states"]
        print(f"| `{r['command']} run` | {r['trials']} ({st['COMPLETE']}/{st['PRUNED']}/{st['FAIL']}) "
              f"| {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['train_seconds']:.1f} | {r['sharpness_seconds']:.1f} "
              f"| {r['other_seconds']:.1f} ({100 * r['other_share']:.1f} %) "
              f"| {r['first_line_seconds']:.1f} / {r['first_trial_seconds']:.1f} | {r['cpu_to_first_trial_seconds'] or 0:.1f} "
              f"| {r['in_trials_other_seconds']:.1f} / {r['between_trials_seconds']:.1f} / {r['after_last_trial_seconds']:.1f} "
              f"| {r['best_val_acc'] or 0:.4f} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead_cli.json").write_text(json.dumps(rows, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="off:fresh,auto:fresh,off:warm,auto:warm",
                    help="comma-separated GUARD:PROCESSES, GUARD off, auto or an epoch count, PROCESSES fresh or warm")
    ap.add_argument("--pack", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write overhead.json (overhead_cli.json) there")
    ap.add_argument("--cli", action="store_true", help="run the quickstart through the CLI, as a user does (issue 27)")
    ap.add_argument("--command", default="sassha-tune", help="with --cli: the command to run (default sassha-tune)")
    ap.add_argument("--repeat", type=int, default=1, help="with --cli: runs, one after another")
    ap.add_argument("--create-only", action="store_true", help="with --cli: run --create-only (no trials, no worker)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="with --cli: passed to run as --set (repeatable), e.g. budget.n_trials=16")
    args = ap.parse_args()
    if args.cli:
        main_cli(args)
        return
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
