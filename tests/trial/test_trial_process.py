"""The trial protocol's child process (``python -m sassha_tune.trial``) through its parent class:
it trains the validated config it is handed as is, and exits quietly when its parent is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from sassha_tune.config import config_from_dict, config_to_dict
from sassha_tune.trial.child import StepMessages
from sassha_tune.trial.process import STARTUP_SECONDS, TrialProcess, WarmWorker, Watchdog

TINY = {
    "study": {"name": "tiny", "pruner": "median"},
    "budget": {"n_trials": 2},
    "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [8]}, "epochs": 2,
             "batch_size": 64, "max_steps_per_epoch": 1},
    "optimizer": {"name": "sgd"},
    "metrics": {"sharpness": False},
    "device": "cpu",
    "seed": 0,
}

# What a trial process is handed: a validated config as plain data (the trial protocol's job)
STORED = config_to_dict(config_from_dict(yaml.safe_load(yaml.safe_dump(TINY)), source="test"))


def test_trial_process_trains_the_config_it_is_handed_without_validating_it():
    # The job carries a validated config as plain data; the child rebuilds it as is. A search-space
    # name that validation would have to resolve (and here could not) is never looked up there.
    stored = json.loads(json.dumps(STORED))
    stored["optimizer"]["search_space"] = "no_such_space"
    proc = TrialProcess({"study": "tiny", "config": stored, "params": {"lr": 0.1}, "device": "cpu", "prune": True})
    messages = []
    for msg in proc.messages():
        messages.append(msg)
        if msg["type"] == "epoch":
            proc.answer(stop=False)  # a pruning job waits for go / stop after each epoch
    assert proc.wait(timeout=60) == 0 and proc.close() == 0
    assert [m["type"] for m in messages] == ["started", "epoch", "epoch", "result"]
    assert messages[-1]["state"] == "complete" and messages[-1]["attrs"]["epochs_completed"] == 2


@pytest.mark.parametrize("params", [{"lr": 0.1}, [{"lr": 0.1}, {"lr": 0.05}]], ids=["trial", "pack"])
def test_trial_process_with_dead_parent_exits_quietly(tmp_path, params):
    job = {"study": "tiny", "config": STORED, "params": params, "device": "cpu", "prune": False}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SASSHA_TUNE_PARENT_PID": str(os.getpid())}
    proc = subprocess.Popen([sys.executable, "-m", "sassha_tune.trial"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    proc.stdout.close()  # nobody reads the protocol any more: every send hits a broken pipe
    _, stderr = proc.communicate(json.dumps(job) + "\n", timeout=120)
    assert proc.returncode == 3, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_the_trial_timeout_counts_from_the_jobs_start_not_the_processs():
    """A process that took 1 s to start (a new warm worker importing torch) still gets its whole
    ``seconds`` after it began the job; without ``begin`` the clock runs from the handing."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        t0 = time.monotonic()
        with Watchdog(proc, 2.0, grace=5, startup=2.0) as deadline:
            time.sleep(1.0)
            assert not deadline.began
            deadline.begin()  # the job's start: the deadline is now t0 + 3 s, not t0 + 2 s
            assert deadline.began
            time.sleep(1.3)
            assert not deadline.fired and proc.poll() is None
            assert proc.wait(timeout=10) == -signal.SIGTERM
            assert deadline.fired and 3.0 <= time.monotonic() - t0 < 8.0
    finally:
        proc.kill()
        proc.wait()


def test_the_trial_timeout_fires_on_time_once_the_job_has_begun():
    """With the default start-up allowance (timeout + 60 s) the watchdog first sleeps toward that
    allowance; the job's ``started`` must wake it to the real deadline, 2 s later, not a minute on."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with Watchdog(proc, 2.0, grace=5) as deadline:
            time.sleep(0.5)  # the watching thread is asleep by now
            began = time.monotonic()
            deadline.begin()
            assert proc.wait(timeout=30) == -signal.SIGTERM
            assert deadline.fired and deadline.began and 2.0 <= time.monotonic() - began < 6.0
    finally:
        proc.kill()
        proc.wait()


def test_a_process_that_never_begins_its_job_is_stopped_after_its_startup_allowance():
    assert Watchdog(None, 4.0).startup == 4.0 + STARTUP_SECONDS  # by default: the timeout and a minute
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        t0 = time.monotonic()
        with Watchdog(proc, 30.0, grace=5, startup=1.0) as deadline:
            assert proc.wait(timeout=10) == -signal.SIGTERM
        assert deadline.fired and not deadline.began and 1.0 <= time.monotonic() - t0 < 5.0
    finally:
        proc.kill()
        proc.wait()


def test_step_messages_are_sent_at_most_every_so_often_and_never_for_an_epochs_last_step():
    now = [0.0]
    sent: list[dict] = []
    single = StepMessages(sent.append, pack=False, every=1.0, clock=lambda: now[0])
    for t, epoch, step in [(0.5, 1, 1), (1.0, 1, 2), (1.5, 1, 3), (2.5, 1, 4), (4.0, 1, 5), (4.1, 2, 1), (4.5, 2, 2)]:
        now[0] = t
        single(epoch, step, 5)
    # 0.5 s: too soon; 1.0: sent; 1.5: too soon; 2.5: sent; 4.0: the epoch's last step (its epoch
    # message follows), so 4.1 is 1.6 s after the last one sent: sent; 4.5: too soon
    assert sent == [{"type": "step", "epoch": 1, "step": 2, "steps": 5}, {"type": "step", "epoch": 1, "step": 4, "steps": 5},
                    {"type": "step", "epoch": 2, "step": 1, "steps": 5}]
    sent.clear()
    pack = StepMessages(sent.append, pack=True, every=0.0, clock=lambda: now[0])
    pack(2, 1, 3, [0, 2])
    assert sent == [{"type": "step", "epoch": 2, "step": 1, "steps": 3, "members": [0, 2]}]


def test_a_warm_worker_that_never_got_a_job_is_stopped_at_once():
    """A study refused before its first trial closes its early-started worker: SIGTERM while it is
    still importing (a worker that had reached its job loop would exit 0 at end of input)."""
    worker = WarmWorker()
    assert worker.close() == -signal.SIGTERM


def test_a_warm_worker_runs_jobs_one_after_another_and_retiring_one_ends_it():
    """Warm or fresh is one class's policy: a job handed to a warm worker is a :class:`TrialProcess`
    whose messages end with the worker's ``done``; the worker takes the next job in the same
    process, until a job retires it (its end of input then ends it, exit 0)."""
    job = {"study": "tiny", "config": STORED, "params": {"lr": 0.1}, "device": "cpu", "prune": False}
    worker = WarmWorker()
    try:
        first = worker.start(job)
        assert [m["type"] for m in first.messages()] == ["started", "epoch", "epoch", "result"]
        assert first.close() == 0 and not worker.spent and worker.proc.poll() is None
        second = worker.start(job)
        assert second.proc.pid == first.proc.pid == worker.pid and worker.jobs == 2
        assert [m["type"] for m in second.messages()][-1] == "result"
        second.retire("a test")
        assert worker.spent and second.why_spent == "a test"
        assert second.close() == 0 and worker.proc.poll() == 0  # the worker was closed with the job
    finally:
        worker.close()
    fresh = TrialProcess(job)
    fresh.retire("a test")  # a fresh process ends with its job: nothing to retire
    assert fresh.why_spent == "" and [m["type"] for m in fresh.messages()][-1] == "result"
    assert fresh.wait(timeout=60) == 0 and fresh.close() == 0
