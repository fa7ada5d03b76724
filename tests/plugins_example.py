"""Plug-ins used by the tests: a model factory and a dataset factory (``tests`` is on sys.path)."""

from __future__ import annotations

import itertools
import time
from collections import deque

import numpy as np
import torch
from torch import nn


def tiny_linear(*, input_shape, num_classes, scale=1.0):
    """A model plug-in: ``factory(input_shape=..., num_classes=..., **options) -> nn.Module``."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model


def tiny_batchnorm(*, input_shape, num_classes, hidden=16):
    """A model plug-in with a normalization layer (BatchNorm1d after its hidden layer)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), hidden), nn.BatchNorm1d(hidden),
                         nn.ReLU(), nn.Linear(hidden, num_classes))


def not_a_module(*, input_shape, num_classes):
    return "nope"


def blobs(*, data_dir=None, seed=0, n=200, as_tuple=False):
    """A dataset plug-in: two Gaussian blobs in 5 dimensions, returned as a mapping or a tuple."""
    rng = np.random.default_rng(123)
    y = rng.integers(0, 2, size=n + 50)
    x = rng.normal(size=(n + 50, 5)).astype(np.float32) + 3.0 * y[:, None]
    if as_tuple:
        return x[:n], y[:n], x[n:], y[n:]
    return {
        "x_train": x[:n],
        "y_train": y[:n],
        "x_test": torch.from_numpy(x[n:]),
        "y_test": y[n:],
        "num_classes": 2,
        "name": "blobs",
    }


def broken(*, data_dir=None, seed=0):
    return 42


# The tokens of MemoryLimited models in the order of their training-mode forwards (the recent ones).
_TRAINING_FORWARDS: deque[int] = deque(maxlen=4096)
_TOKENS = itertools.count()
_BUILT_SINCE_A_FORWARD = [0]


class MemoryLimited(nn.Module):
    """A small MLP with an emulated memory limit: its training-mode forward raises
    ``torch.OutOfMemoryError`` when more than ``max_members`` such models are training at once
    (``max_members=0``: even a lone run), and the factory raises it when it is asked for more than
    ``max_models`` models before any of them ran (``None``: no limit).

    Why emulated: a pack's memory grows with the number of members it holds, and on a GPU the CUDA
    allocator then raises ``torch.OutOfMemoryError`` from inside a pass (or while the members' models
    and optimizer state are set up). On the CPU the real allocator cannot be exhausted safely (the
    host swaps, or the kernel kills the process, instead of an exception), so the tests raise the
    same exception where the pack's size is visible from a model: the members of a pack take their
    steps in turn, so between two training forwards of one model the other members' models run
    theirs. The number of models training at once is one more than the number of other models that
    ran a training forward since this model's previous one (a lone run's forwards follow each
    other: 1). Otherwise the forward is an ordinary deterministic MLP."""

    def __init__(self, input_shape, num_classes, max_members: int, hidden: int) -> None:
        super().__init__()
        self.max_members = int(max_members)
        self.token = next(_TOKENS)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(int(np.prod(input_shape)), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def _training_at_once(self) -> int:
        others = set()
        for token in reversed(_TRAINING_FORWARDS):
            if token == self.token:
                return 1 + len(others)
            others.add(token)
        return 1  # this model's first forward

    def forward(self, x):
        if self.training:
            _BUILT_SINCE_A_FORWARD[0] = 0
            members = self._training_at_once()
            _TRAINING_FORWARDS.append(self.token)
            if members > self.max_members:
                raise torch.OutOfMemoryError(
                    f"emulated: {members} members training at once exceed the limit of {self.max_members}"
                )
        return self.net(x)


def memory_limited(*, input_shape, num_classes, max_members=1, max_models=None, hidden=16):
    """A model plug-in: :class:`MemoryLimited`. It is deterministic and keeps no state outside its
    parameters, so it may be packed like a built-in model (``packable``)."""
    _BUILT_SINCE_A_FORWARD[0] += 1
    if max_models is not None and _BUILT_SINCE_A_FORWARD[0] > max_models:
        _BUILT_SINCE_A_FORWARD[0] = 0  # what ran out is given back: a smaller retry starts afresh
        raise torch.OutOfMemoryError(f"emulated: more than {max_models} models set up at once")
    return MemoryLimited(input_shape, num_classes, max_members, hidden)


memory_limited.packable = True  # the plug-in's promise to packs.pack_blocker (docs/packs.md, "Plug-in models")


class OutOfMemoryWhenMeasured(nn.Module):
    """Trains and validates like an MLP, but runs out of memory (emulated) in a sharpness
    measurement: a forward in eval mode with gradients on, which only the measurement does."""

    def __init__(self, input_shape, num_classes, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        if not self.training and torch.is_grad_enabled():
            raise torch.OutOfMemoryError("emulated: no memory for Hessian-vector products")
        return self.net(x)


def oom_when_measured(*, input_shape, num_classes, hidden=16):
    """A model plug-in: :class:`OutOfMemoryWhenMeasured`."""
    return OutOfMemoryWhenMeasured(input_shape, num_classes, hidden)


# ---- task.train plug-ins (your own training function) ----

def quadratic_x(n: int = 64, dim: int = 4) -> torch.Tensor:
    """The fixed inputs of ``own_quadratic``: its loss's Hessian is ``2/n X^T X``."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(7))


PROCESS_STATE_KEYS = ("default_dtype_bytes", "autocast_cpu", "anomaly", "deterministic", "grad", "threads",
                      "matmul_precision")


def process_state() -> dict:
    """The process-wide torch settings a trial could change and leave behind, as numbers (a train
    function's metrics are numbers)."""
    return {"default_dtype_bytes": float(torch.get_default_dtype().itemsize),
            "autocast_cpu": float(torch.is_autocast_enabled("cpu")), "anomaly": float(torch.is_anomaly_enabled()),
            "deterministic": float(torch.are_deterministic_algorithms_enabled()),
            "grad": float(torch.is_grad_enabled()), "threads": float(torch.get_num_threads()),
            "matmul_precision": float(["highest", "high", "medium"].index(torch.get_float32_matmul_precision()))}


def _spoil_process_state() -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_autocast_enabled("cpu", True)
    torch.autograd.set_detect_anomaly(True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1 if torch.get_num_threads() > 1 else 2)
    torch.set_float32_matmul_precision("medium")


def own_quadratic(reporter):
    """A train function whose objective is the learning rate it was given (``val_acc = lr``, every
    epoch), so a test knows which trial a median pruner stops; it steps the trial's optimizer on a
    least-squares problem and asks for sharpness there. Returns what it saw of the hyperparameters."""
    seen = {f"state_{k}": v for k, v in process_state().items()}  # before this trial changes anything
    x = quadratic_x()
    y = torch.zeros(len(x), 1)
    model = nn.Linear(x.shape[1], 1, bias=False)
    optimizer = reporter.make_optimizer(model)

    def mse(out, target):
        return ((out - target) ** 2).mean()

    for _ in range(reporter.epochs):
        optimizer.step(lambda: mse(model(x), y))
        reporter.report({"val_acc": reporter.hparams["lr"], "train_loss": float(mse(model(x), y))})
        if reporter.options.get("hang_above") is not None and reporter.hparams["lr"] > reporter.options["hang_above"]:
            time.sleep(3600)  # a hung trial: only budget.trial_timeout ends it
    reporter.sharpness_on(model, x, y, loss_fn=mse)
    if reporter.options.get("fail_above") is not None and reporter.hparams["lr"] > reporter.options["fail_above"]:
        raise ValueError(f"lr {reporter.hparams['lr']} too large for this test")
    if reporter.options.get("spoil_above") is not None and reporter.hparams["lr"] > reporter.options["spoil_above"]:
        _spoil_process_state()  # and leave it so: a warm worker must put it back before the next trial
    return {"val_acc": reporter.hparams["lr"], "wd_given": reporter.hparams["weight_decay"],
            "optimizer_is": float(type(optimizer).__name__ == "Sassha"), **seen}


# ---- study.callbacks plug-ins ----

def record_trials(*, path):
    """A callback factory: ``factory(**options) -> callback(study, frozen_trial)`` appending one JSON
    line per finished trial to ``path``."""
    import json

    def callback(study, trial):
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"study": study.study_name, "number": trial.number, "state": trial.state.name,
                                "values": trial.values, "lr": trial.params.get("lr")}) + "\n")

    return callback


def failing_callback():
    def callback(study, trial):
        raise RuntimeError(f"tracker unreachable for trial {trial.number}")

    return callback
