"""Characterization: fixed tiny trials whose every stored number must never change by accident.

Every optimizer on a plain net (MLP) and on a BatchNorm net (ResNet-8), plus three packs against
their lone members, run end to end through the trial path (config -> hyperparameters -> trainer ->
final metrics -> sharpness -> stored attributes). A restructuring that keeps behaviour keeps the
recorded values **bitwise** (floats compared with ``==``).

The values depend on the CPU's vector instructions and the torch build, so there is one recording
per environment (``environment`` in each file), and a machine compares against the one that
matches it; with none, the test is skipped and says why:

- ``characterization.json`` (AVX2): written by the code *before* the "one spine" restructuring,
  which the restructured code reproduces bitwise;
- ``characterization.AVX512.json``: written by the restructured code (at the commit that added it)
  on an AVX512 machine, the kind CI runs on. Forcing AVX2 kernels there (``ATEN_CPU_CAPABILITY``,
  ``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_CBWR``) was tried and does not
  reproduce the AVX2 recording bitwise (the last bits of the losses differ), hence a recording of
  its own.

A change that is meant to alter results regenerates the file of each environment it can reach, in
its own commit, with::

    python tests/test_characterization.py --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TIMING_KEYS

HERE = Path(__file__).parent


def golden_file(cpu_capability: str) -> Path:
    """The recording for one CPU capability (AVX2's file keeps its original name)."""
    return HERE / ("characterization.json" if cpu_capability == "AVX2" else f"characterization.{cpu_capability}.json")

# Wall-clock values differ from run to run; everything else a trial stores is compared.

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
    return _record(evaluate_params(_config(task, optimizer, fixed, clip), {}, device="cpu", progress=False))


def _pack(case: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the members' outcomes in a pack, the same trials run alone)."""
    from sassha_tune.trial.objective import evaluate_pack, evaluate_params

    optimizer, fixed, members = PACKS[case]
    cfg = _config("batchnorm", optimizer, fixed)
    packed = [_record(o) for o in evaluate_pack(cfg, members, device="cpu")]
    alone = [_record(evaluate_params(cfg, p, device="cpu", progress=False)) for p in members]
    return packed, alone


def environment() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _golden() -> dict[str, Any]:
    golden = golden_file(environment()["cpu_capability"])
    if not golden.is_file():
        pytest.skip(f"no recording for {environment()} ({golden.name}: python tests/test_characterization.py --write)")
    data = json.loads(golden.read_text(encoding="utf-8"))
    if data["environment"] != environment():
        pytest.skip(f"values recorded with {data['environment']}, this machine has {environment()}")
    return data


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_trial_is_unchanged(task, case):
    expected = _golden()["lone"][task][case]
    got = _lone(task, case)
    assert got["state"] == expected["state"] and got["failure_reason"] == expected["failure_reason"]
    assert got["history"] == expected["history"]
    assert got["attrs"] == expected["attrs"]
    assert got["values"] == expected["values"]


@pytest.mark.parametrize("case", sorted(PACKS))
def test_pack_is_unchanged(case):
    expected = _golden()["packs"][case]
    packed, alone = _pack(case)
    assert packed == expected["packed"]
    assert alone == expected["alone"]
    if case == "sassha":  # exact kernels: each member is its lone run, bitwise
        for p, a in zip(packed, alone, strict=True):
            a_attrs = {k: v for k, v in a["attrs"].items() if not k.startswith("pack_")}
            assert {k: v for k, v in p["attrs"].items() if not k.startswith("pack_")} == a_attrs
            assert p["history"] == a["history"] and p["values"] == a["values"]


def write() -> None:
    data: dict[str, Any] = {"environment": environment(), "lone": {}, "packs": {}}
    for task in sorted(TASKS):
        data["lone"][task] = {case: _lone(task, case) for case in sorted(OPTIMIZERS)}
    for case in sorted(PACKS):
        packed, alone = _pack(case)
        data["packs"][case] = {"packed": packed, "alone": alone}
    golden = golden_file(data["environment"]["cpu_capability"])
    golden.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {golden}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_characterization.py --write")
    import os

    os.environ["OMP_NUM_THREADS"] = "1"  # as the test session runs (tests/conftest.py)
    torch.set_num_threads(1)
    write()
