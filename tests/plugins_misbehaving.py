"""``task.train`` functions that misbehave the way a user's may (tests/trial/test_trial_isolation.py):
threads left running after the function returned, results that are not metrics. Importable in the
trial processes (tests/conftest.py puts this folder on their PYTHONPATH)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


def late_reporter(reporter):
    """``leave_thread_above``: a trial whose lr is above it returns at once and leaves a thread that
    keeps reporting epochs of 0.999 (as if training went on in the background); it writes what
    ``reporter.report`` raised in that thread to ``record``. Other trials report ``val_acc = lr``
    every epoch, ``epoch_seconds`` apart, and return it."""
    lr = reporter.hparams["lr"]
    options = reporter.options
    if lr > options["leave_thread_above"]:
        def keep_reporting() -> None:
            for _ in range(200):
                time.sleep(0.05)
                try:
                    reporter.report({"val_acc": 0.999})
                except Exception as exc:  # what the late call got: the test reads it
                    Path(options["record"]).write_text(f"{type(exc).__name__}: {exc}")
                    return

        threading.Thread(target=keep_reporting, daemon=True).start()
        time.sleep(0.2)  # the thread is reporting while this trial still runs: those epochs are its own
        return {"val_acc": lr}
    for _ in range(reporter.epochs):
        time.sleep(options["epoch_seconds"])
        reporter.report({"val_acc": lr})
    return {"val_acc": lr}


def leaves_a_thread(reporter):
    """Returns its metrics and leaves a non-daemon thread that sleeps for an hour: the trial
    process must still end (and its result count)."""
    threading.Thread(target=time.sleep, args=(3600,), name="forgotten", daemon=False).start()
    return {"val_acc": reporter.hparams["lr"]}


def leaves_a_thread_and_says_so(reporter):
    """:func:`leaves_a_thread` with a line on stderr as it returns: the cue that its result is on its
    way while the thread keeps its process alive (a few seconds: trial/child.py's EXIT_SECONDS)."""
    threading.Thread(target=time.sleep, args=(3600,), name="forgotten", daemon=False).start()
    print("task.train returns its metrics", file=sys.stderr, flush=True)
    return {"val_acc": reporter.hparams["lr"]}


def malformed_result(reporter):
    """What it returns depends on the trial's lr (``train_options.returns``: lr -> kind): a string
    metric, None, or good metrics."""
    lr = reporter.hparams["lr"]
    reporter.report({"val_acc": lr})
    kind = min(reporter.options["returns"].items(), key=lambda item: abs(float(item[0]) - lr))[1]
    if kind == "string":
        return {"val_acc": "0.5"}
    if kind == "none":
        return None
    return {"val_acc": lr}


HOSTILE = "\x1b]0;pwned\x07\x1b[2J<script>alert(1)</script>"


def raises_hostile(reporter):
    """A train function whose error message holds terminal escape sequences and HTML."""
    raise ValueError(f"bad things {HOSTILE}")


def hostile_dataset(*, data_dir=None, seed=0):
    """A dataset plug-in that fails with terminal escape sequences in its message."""
    raise ValueError(f"cannot load {HOSTILE}")


def float_labels(*, data_dir=None, seed=0, whole=False):
    """A dataset plug-in whose labels are floats: 0.5 / 1.5 (not classes), or 0.0 / 1.0 with ``whole``."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float64) + (0.0 if whole else 0.5)
    return {"x_train": x[:60], "y_train": y[:60], "x_test": x[60:], "y_test": y[60:]}


def float_label_splits(*, data_dir=None, seed=0):
    """A dataset plug-in returning its own Splits, with float labels."""
    import torch

    from sassha_tune.training.data import Splits

    x = torch.randn(30, 4)
    y = torch.tensor([0.5, 1.5] * 15)
    return Splits(x_train=x[:10], y_train=y[:10], x_val=x[10:20], y_val=y[10:20], x_test=x[20:], y_test=y[20:],
                  num_classes=2, input_shape=(4,), augment=None, name="float-splits")
