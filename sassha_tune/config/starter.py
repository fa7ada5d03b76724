"""``sassha-tune init``: the text of a starter config (and, for your own training loop, of the
module its ``task.train`` names).

The config writes only what a user is expected to change (the study's name, the budget, the task,
the optimizer, the device) and leaves the search to its defaults (the optimizer's search space for
the model, its prior first, sampler and pruner ``auto``: docs/tuning.md); comments say what each
key does. The caller validates the text before writing it (:func:`~.validate.config_from_dict`).
"""

from __future__ import annotations

import re

from ..errors import ConfigError

__all__ = ["DEFAULT_DATASET", "default_model", "module_name", "starter_config", "starter_train_module"]

DEFAULT_DATASET = "mnist1d"
#: the built-in model a dataset starts with when ``--model`` is not given
_MODEL_FOR = {"mnist1d": "cnn1d", "digits": "mlp", "synthetic": "mlp", "fashion_mnist": "cnn", "cifar10": "resnet20",
              "cifar100": "resnet20", "text": "gpt"}
_ABOUT = {
    "mnist1d": "MNIST-1D, generated locally",
    "digits": "scikit-learn's 8x8 digits, shipped with scikit-learn",
    "synthetic": "a synthetic task from a random teacher network, generated locally",
    "fashion_mnist": "Fashion-MNIST, read from task.data_dir",
    "cifar10": "CIFAR-10, read from task.data_dir",
    "cifar100": "CIFAR-100, read from task.data_dir",
    "text": "byte-level language modelling on the UTF-8 files of task.data_dir",
}
#: datasets whose files the user must have (``--data-dir``)
FILE_DATASETS = ("fashion_mnist", "cifar10", "cifar100", "text")


def default_model(dataset: str) -> str:
    """The built-in model ``init`` pairs with ``dataset`` when none is given."""
    return _MODEL_FOR.get(dataset, "mlp")


def module_name(study_name: str) -> str:
    """The Python module ``init --own-loop`` writes for study ``study_name``: ``<name>_train``,
    with the characters a module name cannot hold replaced."""
    base = re.sub(r"\W", "_", study_name)
    return ("m_" if base[:1].isdigit() else "") + base + "_train"


def _yaml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _line(key: str, value: str, comment: str, indent: str = "  ") -> str:
    """``  key: value`` with its comment at column 32."""
    text = f"{indent}{key}: {value}"
    return (f"{text}{' ' * max(1, 32 - len(text))}# {comment}" if comment else text) + "\n"


def _header(name: str, what: str, run: str) -> str:
    return f"""# {what}.
# Written by `sassha-tune init`; it runs as it is:
#
#   {run}
#   {run} --set task.epochs=2 --set budget.n_trials=4   # a short try first
#   sassha-tune status {name}
#   sassha-tune report {name} --out reports/{name}
#   sassha-tune rerun {name} --seeds 1,2,3     # the best configuration over more seeds
#
# Every key not written here has its default (docs/config.md), the search included: the
# optimizer's search space for this model, its prior configurations first, then TPE for small
# budgets with successive halving over epochs (docs/tuning.md). `sassha-tune export {name}`
# writes this config with the best trial's hyperparameters fixed (for `sassha-tune train`).
"""


def starter_config(*, name: str, config: str, optimizer: str, dataset: str | None = None, model: str | None = None,
                   data_dir: str | None = None, train: str | None = None) -> str:
    """The YAML text of a starter config for study ``name`` (written to ``config``): a built-in
    ``dataset`` and ``model``, or with ``train`` (``module:function``) your own training function."""
    if train is not None:
        header = _header(name, f"{optimizer} tuned inside your own training function, train in {train.partition(':')[0]}.py",
                         f"PYTHONPATH=. sassha-tune run {config}")
        task = (_line("train", _yaml_str(train), "package.module:function, called in each trial with a reporter")
                + _line("train_options", "{width: 64, batch_size: 64}", "reporter.options: anything your function reads")
                + _line("epochs", "6", "reporter.epochs: the most epochs the function reports"))
    else:
        assert dataset is not None and model is not None
        header = _header(name, f"{optimizer} on {_ABOUT.get(dataset, dataset)}; model {model}", f"sassha-tune run {config}")
        task = _line("dataset", dataset, f"{_ABOUT.get(dataset, 'a built-in dataset')}; nothing is downloaded")
        if data_dir is not None:
            task += _line("data_dir", _yaml_str(data_dir), "where the dataset's files are (relative: to this file)")
        task += (_line("model", _yaml_str(model) if ":" in model else model, "a built-in model or your package.module:factory")
                 + _line("epochs", "10", "each trial's training epochs (pruned trials stop earlier)")
                 + _line("batch_size", "128", ""))
    return "".join([
        header,
        "study:\n",
        _line("name", name, "running the same name again continues the study"),
        _line("objective", "val_acc", "selected on validation accuracy; test accuracy is stored, reported once"),
        "budget:\n",
        _line("n_trials", "20", "trials in all, across runs, resumes and workers"),
        "task:\n",
        task,
        "optimizer:\n",
        _line("name", optimizer, "sgd, adamw, sam_sgd, sam_adamw, adahessian, sophiah, sassha, msassha, ..."),
        "metrics:\n",
        _line("sharpness", "true", "lambda_max, Hessian trace, SAM and adaptive sharpness of each trained trial"),
        _line("device", "auto", "a CUDA GPU when there is one, else the CPU", indent=""),
        _line("seed", "0", "data split, initialization, data order; `sassha-tune rerun` tries others", indent=""),
    ])


def starter_train_module(optimizer: str) -> str:
    """The text of the ``train(reporter)`` module ``init --own-loop`` writes: a complete function
    on a small generated task (replace its data and model with yours)."""
    if not re.fullmatch(r"[a-z_0-9]+", optimizer):
        raise ConfigError(f"--optimizer: expected an optimizer name, got {optimizer!r}")
    return f'''"""Your training function, tuned by sassha-tune (written by `sassha-tune init --own-loop`).

sassha-tune calls ``train(reporter)`` in each trial's own process: the function brings the data,
the model and the loop; ``reporter`` brings the trial's hyperparameters (``reporter.hparams``)
and its optimizer (``reporter.make_optimizer(model)``, {optimizer} with this trial's values),
``reporter.report({{...}})`` once per epoch (the learning curve and the pruner; it raises when the
study prunes the trial), ``reporter.sharpness_on(model, x, y)`` for the sharpness metrics, and
``reporter.options`` / ``reporter.epochs`` / ``reporter.seed`` / ``reporter.device`` from the
config. Return the final metrics (with ``num_classes`` for a classifier).

Replace ``make_data`` and the model with yours. Importing this module runs its top-level code
(once before the study, and in every trial): keep it to definitions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def make_data(seed: int = 0, n: int = 1600, dim: int = 16, classes: int = 3):
    """(train, validation, test) pairs of a task from a random teacher network, 10% of labels flipped."""
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, classes))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(n, dim, generator=g)
        y = teacher(x).argmax(1)
    flip = torch.rand(n, generator=g) < 0.1
    y[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
    a, b = n * 3 // 5, n * 4 // 5
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = model(x)
    model.train()
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def train(reporter):
    width = int(reporter.options.get("width", 64))
    batch_size = int(reporter.options.get("batch_size", 64))
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = make_data()  # the same data for every trial
    torch.manual_seed(reporter.seed)
    model = nn.Sequential(nn.Linear(x_train.shape[1], width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, 3))
    model = model.to(reporter.device)
    x_train, y_train, x_val, y_val, x_test, y_test = (
        t.to(reporter.device) for t in (x_train, y_train, x_val, y_val, x_test, y_test))
    optimizer = reporter.make_optimizer(model)  # the study's optimizer with this trial's hyperparameters
    for _ in range(reporter.epochs):
        order = torch.randperm(len(x_train), device=reporter.device)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            # the closure only computes the loss: the optimizer calls backward itself
            optimizer.step(lambda idx=idx: F.cross_entropy(model(x_train[idx]), y_train[idx]))
        train_loss, train_acc = evaluate(model, x_train, y_train)
        val_loss, val_acc = evaluate(model, x_val, y_val)
        reporter.report({{"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc}})
    reporter.sharpness_on(model, x_train, y_train)  # lambda_max, trace, SAM sharpness on a fixed subset
    test_loss, test_acc = evaluate(model, x_test, y_test)
    return {{"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
            "test_loss": test_loss, "test_acc": test_acc, "num_classes": 3}}
'''
