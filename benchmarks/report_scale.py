"""How `sassha-tune report` and `compare` scale with the number of trials (issue 25; docs/report-scale.md).

Builds SQLite studies of N finished trials (default 100, 1,000 and 10,000) as a real study stores
them: the study is created from examples/quickstart.yaml by sassha-tune itself (its stored config,
search space and provenance), then the trials are written straight into the storage (no
training; the first through Optuna's storage API, the rest as the same rows in one transaction,
all read back through Optuna and checked): the quickstart's searched parameters and distributions, one intermediate value per
epoch, and every user attribute a finished trial stores (metrics, sharpness, its protocol, the
per-epoch history, optimizer hyperparameters, timings, ``num_classes``). About 80 % complete (some
near chance), 10 % pruned, 10 % failed with the reasons the tool stores. Each command then runs
in a child process (``python -m sassha_tune report ...``): its wall time, its CPU time (what the
wall time would be on an idle core, where the machine is shared) and its own peak resident memory
(``os.wait4``).

    OMP_NUM_THREADS=1 python benchmarks/report_scale.py [--sizes 100,1000,10000] [--compare] [--timeout S] [--keep DIR] [--out FILE.json]

Building the 10,000-trial file takes about 20 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import sqlalchemy
from optuna.distributions import FloatDistribution, IntDistribution, distribution_to_json
from optuna.trial import FrozenTrial, TrialState

from sassha_tune.config import load_config
from sassha_tune.provenance import git_commit, package_version
from sassha_tune.study.create import create_or_continue
from sassha_tune.study.storage import open_storage, study_id

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
EPOCHS = 10

DISTRIBUTIONS = {
    "lr": FloatDistribution(0.001, 1.0, log=True),
    "rho": FloatDistribution(0.01, 1.0, log=True),
    "lazy_hessian": IntDistribution(1, 100, log=True),
    "eps": FloatDistribution(1e-4, 0.1, log=True),
    "weight_decay": FloatDistribution(1e-5, 0.01, log=True),
}
FAILURES = ("diverged", "timeout", "out_of_memory", "error: RuntimeError: CUDA error: an illegal memory access")


def _sample(dist: FloatDistribution | IntDistribution, rng: random.Random) -> float | int:
    value = math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
    return int(round(value)) if isinstance(dist, IntDistribution) else value


def _trial(number: int, rng: random.Random, start: dt.datetime) -> FrozenTrial:
    """One finished trial with the attributes a real one stores (numbers drawn, shapes real)."""
    params = {name: _sample(dist, rng) for name, dist in DISTRIBUTIONS.items()}
    roll = rng.random()
    state = TrialState.COMPLETE if roll < 0.8 else TrialState.PRUNED if roll < 0.9 else TrialState.FAIL
    epochs = EPOCHS if state == TrialState.COMPLETE else rng.randint(1, EPOCHS - 1)
    collapsed = rng.random() < 0.1
    final_val = 0.1 + rng.random() * 0.02 if collapsed else rng.uniform(0.3, 0.95)
    history, curve = [], {}
    for epoch in range(1, epochs + 1):
        val = final_val * (0.5 + 0.5 * epoch / epochs)
        history.append({"epoch": epoch, "train_loss": 2.3 * (1 - 0.6 * val), "train_acc": val + 0.02,
                        "val_loss": 2.3 * (1 - 0.55 * val), "val_acc": val, "lr": params["lr"] * (1 - epoch / epochs),
                        "seconds": rng.uniform(0.4, 0.7)})
        curve[epoch] = val
    attrs: dict = {"device": "cpu", "epochs_completed": epochs, "history": history, "num_classes": 10,
                   "seed": 0, "train_seconds": rng.uniform(3, 8), "ms_per_step": rng.uniform(5, 15),
                   "optimizer_hparams": {**params, "dense_refresh_steps": 50, "seed": 0}}
    values = None
    if state == TrialState.COMPLETE:
        lam = math.exp(rng.gauss(0, 1.5))
        val, train = final_val, final_val + rng.uniform(-0.03, 0.1)
        attrs.update({
            "val_acc": val, "val_loss": 2.3 * (1 - 0.55 * val), "train_acc": train, "train_loss": 2.3 * (1 - 0.6 * train),
            "test_acc": val - rng.uniform(0, 0.02), "test_loss": 2.3 * (1 - 0.5 * val),
            "gen_gap_acc": train - val, "gen_gap_loss": rng.uniform(-0.1, 0.3), "lambda_max": lam,
            "hessian_trace": lam * rng.uniform(3, 10), "hessian_trace_se": lam * rng.uniform(0.1, 1),
            "sam_sharpness": lam * 0.01 * rng.uniform(0.5, 2), "adaptive_sharpness": lam * 0.003 * rng.uniform(0.5, 2),
            "hvp_count": 47, "sharpness_seconds": rng.uniform(1, 3),
            "sharpness_protocol": {"subset_size": 512, "subset_seed": 0, "chunk_size": None, "mode": "eval",
                                   "dtype": "float32", "autocast": False, "tf32": False, "lambda_method": "lanczos",
                                   "lambda_tol": 1e-4, "lambda_max_iters": 30, "lambda_hvps": 17,
                                   "trace_probes": 30, "trace_batch_size": 1, "sam_rho": 0.05,
                                   "adaptive_rho": 0.5, "ascent_steps": 5},
        })
        values = [val]
    elif state == TrialState.FAIL:
        attrs["failure_reason"] = rng.choice(FAILURES)
    begun = start + dt.timedelta(seconds=10 * number)
    return FrozenTrial(number=number, state=state, value=None, values=values, datetime_start=begun,
                       datetime_complete=begun + dt.timedelta(seconds=attrs["train_seconds"] + 2),
                       params=params, distributions=dict(DISTRIBUTIONS), user_attrs=attrs,
                       system_attrs={"sassha_tune:worker": "bench:1"}, intermediate_values=curve,
                       trial_id=0)


def _insert_trials(url: str, sid: int, trials: list[FrozenTrial]) -> None:
    """``trials`` added to study ``sid`` in one transaction, the rows Optuna's RDB storage writes
    for them (its tables read from the file). Optuna's ``create_new_trial`` costs ~40 ms a trial
    here (10,000: ~7 min); :func:`build_study` checks that Optuna reads back what was meant."""
    engine = sqlalchemy.create_engine(url)
    meta = sqlalchemy.MetaData()
    meta.reflect(engine)
    tables = meta.tables
    rows: dict[str, list[dict]] = {name: [] for name in ("trials", "trial_params", "trial_values",
                                                          "trial_intermediate_values", "trial_user_attributes",
                                                          "trial_system_attributes")}
    with engine.begin() as conn:
        first = conn.execute(sqlalchemy.select(sqlalchemy.func.max(tables["trials"].c.trial_id))).scalar() or 0
        for tid, t in enumerate(trials, start=first + 1):
            rows["trials"].append({"trial_id": tid, "number": t.number, "study_id": sid, "state": t.state.name,
                                   "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete})
            rows["trial_params"] += [{"trial_id": tid, "param_name": k, "distribution_json": distribution_to_json(d),
                                      "param_value": d.to_internal_repr(t.params[k])}
                                     for k, d in t.distributions.items()]
            rows["trial_values"] += [{"trial_id": tid, "objective": i, "value": v, "value_type": "FINITE"}
                                     for i, v in enumerate(t.values or [])]
            rows["trial_intermediate_values"] += [{"trial_id": tid, "step": step, "intermediate_value": v,
                                                   "intermediate_value_type": "FINITE"}
                                                  for step, v in t.intermediate_values.items()]
            for table, attrs in (("trial_user_attributes", t.user_attrs), ("trial_system_attributes", t.system_attrs)):
                rows[table] += [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
        for name, batch in rows.items():
            if batch:
                conn.execute(tables[name].insert(), batch)
    engine.dispose()


def _same(stored: FrozenTrial, meant: FrozenTrial) -> bool:
    return (stored.number, stored.state, stored.params, stored.distributions, stored.values, stored.user_attrs,
            stored.system_attrs, stored.intermediate_values, stored.datetime_start, stored.datetime_complete) == (
        meant.number, meant.state, meant.params, meant.distributions, meant.values, meant.user_attrs,
        meant.system_attrs, meant.intermediate_values, meant.datetime_start, meant.datetime_complete)


def build_study(db: Path, name: str, n_trials: int, seed: int = 0) -> float:
    """A study ``name`` of ``n_trials`` finished trials in SQLite file ``db``; seconds it took.
    The first trials go through Optuna's own ``create_new_trial``, the rest through
    :func:`_insert_trials`; every trial is read back through Optuna and must be what was meant."""
    t0 = time.perf_counter()
    url = f"sqlite:///{db}"
    cfg = load_config(QUICKSTART)
    cfg.study.name = name
    cfg.budget.n_trials = n_trials
    study = create_or_continue(cfg, url, log=lambda _: None)
    storage, sid = open_storage(url), study_id(study)
    rng = random.Random(seed)
    start = dt.datetime(2025, 1, 1)
    meant = [_trial(number, rng, start) for number in range(n_trials)]
    by_api = min(n_trials, 5)
    for trial in meant[:by_api]:
        storage.create_new_trial(sid, template_trial=trial)
    _insert_trials(url, sid, meant[by_api:])
    stored = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    wrong = [m.number for s, m in zip(stored, meant, strict=True) if not _same(s, m)]
    if wrong:
        raise SystemExit(f"trials {wrong[:5]} read back differ from what was written")
    return time.perf_counter() - t0


# Runs the command given and prints its wall and CPU seconds, exit code and own peak RSS (KiB) as JSON.
# A small process of its own (the standard library only): a child's ru_maxrss counts what the
# process that forked it held, so the command is started from here, not from this script (which
# holds the studies it built).
_TIMED = """
import json, os, subprocess, sys, threading, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
timer = threading.Timer(float(sys.argv[1]), proc.kill)
timer.start()
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
timer.cancel()
sys.stderr.write(err.decode(errors="replace")[-2000:])
print(json.dumps({"seconds": time.perf_counter() - t0, "code": os.waitstatus_to_exitcode(status),
                  "cpu_seconds": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss}))
"""


def measure(argv: list[str], timeout: float) -> dict:
    """Run ``python -m sassha_tune ARGV``: its wall seconds, its CPU seconds (user + system: what
    the wall time would be on an idle core, the machine being shared) and its own peak resident
    memory (MiB); ``finished: false`` when it still ran after ``timeout`` seconds (it is killed then)."""
    done = subprocess.run([sys.executable, "-c", _TIMED, str(timeout), sys.executable, "-m", "sassha_tune", *argv],
                          capture_output=True, text=True, check=True)
    got = json.loads(done.stdout)
    if got["code"] not in (0, -signal.SIGKILL):
        raise SystemExit(f"{' '.join(argv[:2])} failed ({got['code']}):\n{done.stderr}")
    return {"finished": got["code"] == 0, "seconds": round(got["seconds"], 2),
            "cpu_seconds": round(got["cpu_seconds"], 2), "peak_mib": round(got["maxrss_kib"] / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000", help="trial counts")
    parser.add_argument("--compare", action="store_true", help="also time `compare` of two studies of each size")
    parser.add_argument("--keep", type=Path, help="build the studies in this folder and keep them (a later run reuses them)")
    parser.add_argument("--timeout", type=float, default=600, help="stop a command after this many seconds")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for n in sizes:
            db = folder / f"scale-{n}.db"
            built = None  # a kept file from an earlier run is used as it is
            if not (args.keep and db.exists()):
                built = build_study(db, "scale", n)
                build_study(db, "scale-b", n, seed=1)  # the second study of `compare`
            url = f"sqlite:///{db}"
            row = {"trials": n, "build_seconds": built and round(built, 1), "db_mib": round(db.stat().st_size / 2**20, 1),
                   "report": measure(["report", "scale", "--storage", url, "--out", str(folder / f"report-{n}")], args.timeout)}
            if args.compare:
                row["compare"] = measure(["compare", "scale", "scale-b", "--storage", url,
                                          "--out", str(folder / f"compare-{n}")], args.timeout)
            results.append(row)
            print(json.dumps(row), flush=True)
    meta = {"date": dt.date.today().isoformat(), "commit": git_commit(), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "versions": {k: package_version(k) for k in ("optuna", "numpy", "matplotlib", "plotly", "SQLAlchemy")}}
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
