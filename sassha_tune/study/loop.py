"""The ask-tell loop: run a stored study's trials until its budget is spent.

Each iteration re-reads the stored config (another process may raise the budget), reconciles lost
trials, checks the budget, asks with a sampler seeded from the study's progress, trains the trial
(or a pack of trials) in a fresh process and tells the outcome.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import Config
from ..errors import UserError
from ..spaces import SearchSpace, suggest, to_hparams
from ..trial.device import check_device
from .budget import budget_used, counts_toward_budget
from .create import plain, stored_config
from .liveness import Heartbeat, reconcile
from .samplers import make_pruner, make_sampler, trial_seed
from .storage import load_study, study_storage, trial_id, with_retry
from .tell import fail, finish

__all__ = ["WORKER_KEY", "LoopSummary", "run_trials", "start_trial", "sampler_for", "pruner_for"]

WORKER_KEY = "sassha_tune:worker"

Log = Callable[[str], None]


def sampler_for(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    """The study's sampler (``study.sampler``) seeded with ``seed`` for one ask."""
    s = cfg.study.sampler
    return make_sampler(s.name, s.options, seed, qmc_seed=cfg.sampler_seed)


def pruner_for(cfg: Config) -> optuna.pruners.BasePruner:
    """The study's pruner (``study.pruner``)."""
    return make_pruner(cfg.study.pruner.name, cfg.study.pruner.options, max_resource=cfg.task.epochs)


@dataclass
class LoopSummary:
    ran: int = 0
    states: Counter = field(default_factory=Counter)
    stopped_because: str = ""
    seconds: float = 0.0


def _describe(frozen: FrozenTrial, cfg: Config) -> str:
    state = frozen.state.name
    if frozen.state == TrialState.COMPLETE:
        values = ", ".join(f"{m}={v:.4g}" for m, v in zip(cfg.study.metrics, frozen.values or [], strict=False))
        extra = frozen.user_attrs.get("lambda_max")
        tail = f" lambda_max={extra:.4g}" if isinstance(extra, (int, float)) and "lambda_max" not in cfg.study.metrics else ""
        return f"trial {frozen.number} {state} {values}{tail}"
    if frozen.state == TrialState.FAIL:
        return f"trial {frozen.number} FAIL ({frozen.user_attrs.get('failure_reason')})"
    return f"trial {frozen.number} {state}"


def run_trials(
    study_name: str,
    storage_url: str,
    *,
    worker: int | str = 0,
    device: str | None = None,
    log: Log = print,
    pack: str | int = 1,
) -> LoopSummary:
    """Run trials of a stored study until its budget (or ``budget.timeout``) is reached.

    ``pack`` (``--pack``): ``1`` one trial per process; ``K`` or ``"auto"``: up to K trials asked at
    once and trained together in one process (:mod:`sassha_tune.packs`) where they can be packed."""
    from ..data import check_dataset_files

    study = load_study(study_name, storage_url)
    cfg, _ = stored_config(study)
    check_device(device or cfg.device.name, "--device" if device else "device")  # before any trial is asked
    check_dataset_files(cfg.task.dataset, cfg.task.data_dir)
    summary = LoopSummary()
    start = time.monotonic()
    restore = _sigterm_as_interrupt()
    waiting = False
    pack_logged = ""
    try:
        while True:
            cfg, space = stored_config(study)  # re-read: another process may extend the budget
            study.pruner = pruner_for(cfg)
            reconcile(study, cfg.study.stale_after, log=log)
            trials = with_retry(study.get_trials, deepcopy=False)
            used = budget_used(trials)
            if cfg.budget.timeout is not None and time.monotonic() - start >= cfg.budget.timeout:
                summary.stopped_because = f"timeout ({cfg.budget.timeout:g} s)"
                break
            if used >= cfg.budget.n_trials:
                running = [t.number for t in trials if t.state == TrialState.RUNNING]
                if running:
                    # Another process holds them; if it died, they go stale and come back as retries.
                    if not waiting:
                        log(f"waiting for running trial(s) {running} of other processes")
                        waiting = True
                    time.sleep(min(cfg.study.heartbeat_interval, 5.0))
                    continue
                summary.stopped_because = f"budget reached ({used}/{cfg.budget.n_trials} trials)"
                break
            waiting = False
            study.sampler = sampler_for(cfg, trial_seed(cfg.sampler_seed, len(trials), worker))
            if pack != 1:
                from ..packs import choose_pack_size, run_pack_trials

                size, why = choose_pack_size(cfg, pack, device=device, budget_left=cfg.budget.n_trials - used)
                if why != pack_logged:
                    log(why)
                    pack_logged = why
                size = min(size, cfg.budget.n_trials - used)
                if size > 1:
                    asked = [with_retry(study.ask) for _ in range(size)]
                    told = run_pack_trials(study, asked, cfg, space, device=device, worker=worker, log=log)
                    if not told:
                        summary.stopped_because = f"budget reached ({cfg.budget.n_trials} trials)"
                        break
                    for frozen in told:
                        summary.ran += 1
                        summary.states[frozen.state.name] += 1
                        log(_describe(frozen, cfg))
                    continue
            trial = with_retry(study.ask)
            frozen = _run_one(study, trial, cfg, space, device=device, worker=worker, log=log)
            if frozen is None:  # lost the race for the last slot of the budget
                summary.stopped_because = f"budget reached ({cfg.budget.n_trials} trials)"
                break
            summary.ran += 1
            summary.states[frozen.state.name] += 1
            log(_describe(frozen, cfg))
    finally:
        restore()
        summary.seconds = time.monotonic() - start
    return summary


def start_trial(study: optuna.Study, trial: optuna.Trial, cfg: Config, space: SearchSpace) -> dict[str, Any] | None:
    """Claim an asked trial for this process: record the worker, fail it as ``over_budget`` when
    another worker filled the budget first (then None), else sample its params and store the
    optimizer's constructor arguments and the seed. Shared by single trials and packs."""
    with_retry(study_storage(study).set_trial_system_attr, trial_id(trial), WORKER_KEY,
               f"{os.uname().nodename}:{os.getpid()}")
    before = [t for t in with_retry(study.get_trials, deepcopy=False)
              if t.number < trial.number and counts_toward_budget(t)]
    if len(before) >= cfg.budget.n_trials:
        fail(study, trial, "over_budget")
        return None
    params = suggest(trial, space)
    hparams = to_hparams(cfg.optimizer.name, {**cfg.optimizer.fixed, **params}, seed=cfg.seed)
    with_retry(trial.set_user_attr, "optimizer_hparams", plain(dict(hparams)))
    with_retry(trial.set_user_attr, "seed", cfg.seed)
    return params


@dataclass
class Outcome:
    state: str
    attrs: dict[str, Any] = field(default_factory=dict)
    values: list[float] | None = None
    failure_reason: str | None = None


class TrialProcess:
    """``python -m sassha_tune.objective``: JSON job in, JSON lines out, go/stop replies."""

    def __init__(self, job: dict[str, Any], env: Mapping[str, str] | None = None) -> None:
        full_env = dict(os.environ if env is None else env)
        full_env["SASSHA_TUNE_PARENT_PID"] = str(os.getpid())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sassha_tune.objective"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=full_env,
            bufsize=1,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def messages(self):
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                yield json.loads(line)

    def reply(self, text: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> int:
        self.stop()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        return self.proc.returncode


def _run_trial_process(job: dict[str, Any], trial: optuna.Trial, prune_metric: str | None, holder: list) -> Outcome:
    proc = TrialProcess(job)
    holder.append(proc)
    outcome: Outcome | None = None
    user_error: str | None = None
    history: list[dict[str, Any]] = []
    for msg in proc.messages():
        kind = msg.get("type")
        if kind == "epoch":
            metrics = msg.get("metrics", {})
            history.append(metrics)
            if prune_metric is not None:
                value = metrics.get(prune_metric)
                stop = False
                if isinstance(value, (int, float)):
                    trial.report(float(value), int(msg["epoch"]))
                    stop = trial.should_prune()
                proc.reply("stop" if stop else "go")
        elif kind == "result":
            outcome = Outcome(msg["state"], msg.get("attrs") or {}, msg.get("values"), msg.get("failure_reason"))
        elif kind == "user_error":
            user_error = str(msg.get("message"))
    proc.proc.wait()
    rc = proc.close()
    if user_error is not None:
        raise UserError(user_error)
    if outcome is None:
        reason = f"error: trial process exited with code {rc}"
        if rc is not None and rc < 0:
            reason = f"error: trial process killed by signal {-rc}"
            if -rc == signal.SIGKILL:
                reason = "error: trial process killed (SIGKILL; out of host memory?)"
        outcome = Outcome("fail", failure_reason=reason)
    outcome.attrs["history"] = [
        {k: m.get(k) for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")} for m in history
    ]
    return outcome


def _run_one(
    study: optuna.Study, trial: optuna.Trial, cfg: Config, space: SearchSpace, *, device: str | None,
    worker: int | str, log: Log,
) -> FrozenTrial | None:
    holder: list[TrialProcess] = []
    try:
        with Heartbeat(study, trial, cfg.study.heartbeat_interval):
            params = start_trial(study, trial, cfg, space)
            if params is None:
                return None
            job = {
                "study": study.study_name,
                "config": study.user_attrs["config"],
                "params": params,
                "device": device,
                "prune": cfg.study.pruner.name != "none",
            }
            prune_metric = cfg.study.metrics[0] if cfg.study.pruner.name != "none" else None
            log(f"trial {trial.number} started: {fmt_params(params)}")
            outcome = _run_trial_process(job, trial, prune_metric, holder)
            return finish(study, trial, outcome)
    except KeyboardInterrupt:
        for p in holder:
            p.stop()
        fail(study, trial, "interrupted")
        log(f"trial {trial.number} interrupted: marked FAIL")
        raise
    except UserError as exc:
        for p in holder:
            p.stop()
        fail(study, trial, f"error: {exc}"[:300])
        raise
    except BaseException:
        for p in holder:
            p.stop()
        fail(study, trial, "error: sassha-tune crashed while running this trial")
        raise


def fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Treat SIGTERM like Ctrl-C while trials run (the running trial is marked interrupted)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)
