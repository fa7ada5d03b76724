"""Characterization: fixed tiny trials whose every stored number must never change by accident.

Every optimizer on a plain net (MLP) and on a BatchNorm net (ResNet-8), plus three packs against
their lone members, run end to end through the trial path (config -> hyperparameters -> trainer ->
final metrics -> sharpness -> stored attributes), and every stored number is compared with
``characterization.json``.

**Portable by construction.** The trials run in float64 (``torch.set_default_dtype``; the data
loader follows it) and are short (10 steps), so the last-bit differences between CPUs' kernels
(AVX-512 or AVX2 or no vectors, Intel or AMD, MKL's or oneDNN's code path, an ARM build) stay
near float64's resolution, ~1e-16, while any change to an update rule, a schedule, a metric or
the order of random draws moves some stored number by far more than :data:`RTOL`:

- measured spread between CPU code paths (``ATEN_CPU_CAPABILITY=default``, ``avx2`` and
  ``avx512`` on one AMD EPYC Zen 4 machine, each recording against the ``avx512`` one): at most
  3.8e-12 relative over every stored number (5.0e-12 for ``gen_gap_loss``, a difference of two
  losses, 4.5e-14 absolute);
- planted changes to SASSHA's update (:func:`test_a_planted_change_in_an_update_rule_fails`):
  a step one float32 ulp (2**-23) longer moves stored numbers by up to 1.2e-8 (plain net) and
  1.5e-7 (BatchNorm net) relative; eps added under the power instead of after it by 0.20 and 0.30;
- so :data:`RTOL` = 3e-10: 60x above the spread between CPUs, 40x below the smallest planted
  change. ``--diff`` (below) re-measures the spread between two recordings; docs/benchmarks.md
  ("Characterization tolerance") has the table.

Everything that is not a float (states, failure reasons, integers, strings) is compared exactly.
Where the design promises bitwise equality between two paths (a SASSHA pack member against the
same trial alone), the two are computed in the same run and compared with ``==``.

A change that is meant to alter results regenerates the recording in its own commit, saying why::

    python tests/test_characterization.py --write tests/characterization.json
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TIMING_KEYS

HERE = Path(__file__).parent
RECORDING = HERE / "characterization.json"

# Relative tolerance for stored floats, and the absolute floor for values that are ~0 (a loss
# difference, a correlation, a gap that cancels): see the module docstring for how both were chosen.
RTOL = 3e-10
ATOL = 1e-12

TASKS: dict[str, dict[str, Any]] = {
    "plain": {
        "dataset": "synthetic", "dataset_options": {"n": 400, "n_test": 64, "dim": 20},
        "model": "mlp", "model_options": {"hidden": [32, 32]},
        "epochs": 2, "batch_size": 32, "max_steps_per_epoch": 5, "label_noise": 0.1,
    },
    "batchnorm": {
        "dataset": "synthetic", "dataset_options": {"n": 400, "n_test": 64, "shape": [3, 8, 8]},
        "model": "resnet8", "model_options": {"width": 4},
        "epochs": 2, "batch_size": 32, "max_steps_per_epoch": 5,
    },
}

# optimizer.fixed per case (config convention: weight_decay is the scripts' wd for decoupled ones)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {"lr": 0.05, "weight_decay": 5e-4}),
    "adamw": ("adamw", {"lr": 1e-3, "weight_decay": 0.05}),
    "sam_sgd": ("sam_sgd", {"lr": 0.05, "rho": 0.05, "weight_decay": 5e-4}),
    "sam_adamw": ("sam_adamw", {"lr": 1e-3, "rho": 0.05, "weight_decay": 0.01}),
    "adahessian": ("adahessian", {"lr": 0.05, "lazy_hessian": 2, "dense_refresh_steps": 2, "weight_decay": 1e-4}),
    "sophiah": ("sophiah", {"lr": 0.01, "lazy_hessian": 3, "clip_threshold": 0.05, "beta1": 0.9, "beta2": 0.999,
                            "eps": 1e-4}),
    "sassha": ("sassha", {"lr": 0.05, "rho": 0.05, "lazy_hessian": 3, "dense_refresh_steps": 2, "eps": 1e-4,
                          "weight_decay": 5e-4}),
    "sassha_variants": ("sassha", {"lr": 0.03, "rho": 0.1, "lazy_hessian": 2, "hessian_point": "perturbed",
                                   "bias_correction": "refreshes", "adaptive": True, "hessian_power": 1.0,
                                   "n_samples": 2}),
    "msassha": ("msassha", {"lr": 0.05, "rho": 0.1, "lazy_hessian": 2, "weight_decay": 1e-3}),
}

# packs: (optimizer, fixed, per-member searched params); members differ in lr (and rho, k)
PACKS: dict[str, tuple[str, dict[str, Any], list[dict[str, Any]]]] = {
    "sgd": ("sgd", {"weight_decay": 5e-4}, [{"lr": 0.05}, {"lr": 0.1}, {"lr": 0.02}]),
    "sam_sgd": ("sam_sgd", {}, [{"lr": 0.05, "rho": 0.05}, {"lr": 0.1, "rho": 0.2}, {"lr": 0.02, "rho": 0.01}]),
    "sassha": ("sassha", {"dense_refresh_steps": 2}, [{"lr": 0.05, "rho": 0.05, "lazy_hessian": 3},
                                                      {"lr": 0.1, "rho": 0.1, "lazy_hessian": 1},
                                                      {"lr": 0.02, "rho": 0.02, "lazy_hessian": 2}]),
}


@contextmanager
def float64() -> Iterator[None]:
    """Models, data and optimizer state in float64 for the duration (the previous default after)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _config(task: str, optimizer: str, fixed: dict[str, Any], clip: float = 0.0):
    from sassha_tune.config import config_from_dict

    raw = {
        "study": {"name": f"char-{task}-{optimizer}"},
        "task": TASKS[task],
        "optimizer": {"name": optimizer, "fixed": fixed, "grad_clip": clip},
        "schedule": {"name": "cosine", "warmup_fraction": 0.1},
        "metrics": {"subset_size": 64, "budget": {"lambda_max_iters": 8, "trace_probes": 8, "sam_steps": 3}},
        "device": "cpu",
        "seed": 3,
    }
    return config_from_dict(raw)


def _record(outcome: Any) -> dict[str, Any]:
    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in TIMING_KEYS}

    attrs = strip(outcome.attrs)
    attrs.pop("history", None)
    return {
        "state": outcome.state,
        "values": outcome.values,
        "failure_reason": outcome.failure_reason,
        "attrs": json.loads(json.dumps(attrs)),
        "history": [strip(h) for h in json.loads(json.dumps(outcome.history))],
    }


def _lone(task: str, case: str) -> dict[str, Any]:
    from sassha_tune.trial.objective import evaluate_params

    optimizer, fixed = OPTIMIZERS[case]
    clip = 1.0 if case in ("sgd", "sassha") else 0.0  # the clipping path of a one-pass and a two-pass optimizer
    with float64():
        return _record(evaluate_params(_config(task, optimizer, fixed, clip), {}, device="cpu", progress=False))


def _pack(case: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the members' outcomes in a pack, the same trials run alone)."""
    from sassha_tune.trial.objective import evaluate_params, evaluate_trials

    optimizer, fixed, members = PACKS[case]
    cfg = _config("batchnorm", optimizer, fixed)
    with float64():
        packed = [_record(o) for o in evaluate_trials(cfg, members, device="cpu")]
        alone = [_record(evaluate_params(cfg, p, device="cpu", progress=False)) for p in members]
    return packed, alone


def mismatches(got: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL, path: str = "") -> list[str]:
    """Where ``got`` differs from ``expected``: floats beyond ``atol + rtol * |expected|``, anything
    else (keys, lengths, types, ints, strings, None) by ``!=``; one line per difference."""
    if isinstance(expected, float) and isinstance(got, (float, int)) and not isinstance(got, bool):
        if math.isnan(expected) and math.isnan(got):
            return []
        if abs(got - expected) <= atol + rtol * abs(expected):
            return []
        rel = abs(got - expected) / abs(expected) if expected else math.inf
        return [f"{path or '.'}: {got!r} != {expected!r} (relative {rel:.1e})"]
    if isinstance(expected, dict) and isinstance(got, dict):
        if got.keys() != expected.keys():
            return [f"{path or '.'}: keys {sorted(got)} != {sorted(expected)}"]
        return [m for k in expected for m in mismatches(got[k], expected[k], rtol, atol, f"{path}.{k}")]
    if isinstance(expected, list) and isinstance(got, list):
        if len(got) != len(expected):
            return [f"{path or '.'}: length {len(got)} != {len(expected)}"]
        return [m for i, (g, e) in enumerate(zip(got, expected, strict=True))
                for m in mismatches(g, e, rtol, atol, f"{path}[{i}]")]
    return [] if got == expected and type(got) is type(expected) else [f"{path or '.'}: {got!r} != {expected!r}"]


def largest_relative_difference(got: Any, expected: Any, atol: float = ATOL) -> float:
    """The largest relative difference between two recordings' floats (values at or below ``atol``
    in both count as equal): the measurement behind :data:`RTOL`."""
    if isinstance(expected, float) and isinstance(got, (float, int)):
        if abs(got - expected) <= atol or (math.isnan(expected) and math.isnan(got)):
            return 0.0
        return abs(got - expected) / abs(expected) if expected else math.inf
    if isinstance(expected, dict):
        return max((largest_relative_difference(got[k], expected[k], atol) for k in expected), default=0.0)
    if isinstance(expected, list):
        return max((largest_relative_difference(g, e, atol) for g, e in zip(got, expected, strict=True)),
                   default=0.0)
    return 0.0


def _expect(got: Any, expected: Any) -> None:
    found = mismatches(got, expected)
    assert not found, f"{len(found)} stored numbers changed:\n" + "\n".join(found[:12])


@pytest.fixture(scope="module")
def recording() -> dict[str, Any]:
    return json.loads(RECORDING.read_text(encoding="utf-8"))


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_trial_is_unchanged(recording, task, case):
    _expect(_lone(task, case), recording["lone"][task][case])


@pytest.mark.parametrize("case", sorted(PACKS))
def test_pack_is_unchanged(recording, case):
    packed, alone = _pack(case)
    _expect(packed, recording["packs"][case]["packed"])
    _expect(alone, recording["packs"][case]["alone"])
    if case == "sassha":  # exact kernels: each member is its lone run, bitwise, in this run
        for p, a in zip(packed, alone, strict=True):
            a_attrs = {k: v for k, v in a["attrs"].items() if not k.startswith("pack_")}
            assert {k: v for k, v in p["attrs"].items() if not k.startswith("pack_")} == a_attrs
            assert p["history"] == a["history"] and p["values"] == a["values"]


def _step_one_ulp_longer(original):
    """SASSHA's update with a step one float32 ulp (2**-23 relative) longer: a typo-sized change."""

    def planted(*args: Any, **kwargs: Any) -> None:
        return original(*args, **{**kwargs, "lr": kwargs["lr"] * (1.0 + 2.0**-23)})

    return planted


def _eps_under_the_power(original):
    """SASSHA's update with eps added to v before the power instead of after it."""

    def planted(params, exp_avgs, exp_hessian_diags, bias_corrections2, steps, *, lr, beta1, eps, alpha):
        denom = torch._foreach_pow(torch._foreach_add(exp_hessian_diags, eps), alpha)
        torch._foreach_div_(denom, bias_corrections2)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**t) for t in steps])

    return planted


PLANTED = {"step_one_ulp_longer": _step_one_ulp_longer, "eps_under_the_power": _eps_under_the_power}


@pytest.mark.parametrize("plant", sorted(PLANTED))
def test_a_planted_change_in_an_update_rule_fails(recording, monkeypatch, plant):
    """The tolerance is tight enough to catch an update rule changed at float32's last bit: each
    planted change to SASSHA's update makes the unchanged recording fail."""
    from sassha_tune.optim import preconditioned

    expected = recording["lone"]["plain"]["sassha"]
    monkeypatch.setattr(preconditioned, "sassha_update_", PLANTED[plant](preconditioned.sassha_update_))
    got = _lone("plain", "sassha")
    assert mismatches(got, expected), f"planted change {plant!r} went unnoticed: RTOL is too loose"
    # how far it moved the stored numbers: far above the spread between CPUs (docstring)
    assert largest_relative_difference(got, expected) > 10 * RTOL


def environment() -> dict[str, str]:
    """Where a recording was written (kept for the record; the comparison does not depend on it)."""
    import platform

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "dtype": "float64"}


def write(path: Path) -> None:
    data: dict[str, Any] = {"environment": environment(), "lone": {}, "packs": {}}
    for task in sorted(TASKS):
        data["lone"][task] = {case: _lone(task, case) for case in sorted(OPTIMIZERS)}
    for case in sorted(PACKS):
        packed, alone = _pack(case)
        data["packs"][case] = {"packed": packed, "alone": alone}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path} ({data['environment']})")


def diff(a: Path, b: Path) -> None:
    """Print the largest relative difference per case between two recordings."""
    ra, rb = (json.loads(p.read_text(encoding="utf-8")) for p in (a, b))
    print(f"{a.name}: {ra['environment']}\n{b.name}: {rb['environment']}")
    worst = 0.0
    for section in ("lone", "packs"):
        for key in ra[section]:
            d = largest_relative_difference(ra[section][key], rb[section][key])
            worst = max(worst, d)
            print(f"  {section}.{key}: {d:.2e}")
    print(f"largest relative difference: {worst:.2e} (RTOL {RTOL:.0e})")


if __name__ == "__main__":
    import os

    os.environ["OMP_NUM_THREADS"] = "1"  # as the test session runs (tests/conftest.py)
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--diff":
        diff(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit("usage: python tests/test_characterization.py --write FILE | --diff FILE_A FILE_B")
