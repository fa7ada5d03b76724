"""The one evaluate function (trial/objective.py ``evaluate_trials``): a single trial (K = 1) stores
and computes exactly what the trainer's lone run and the outcome assembly give, bit for bit and
without pack attributes; K > 1 trials are a pack whose members say where they ran."""

from __future__ import annotations

import json
from typing import Any

from conftest import untimed

from sassha_tune.config import config_from_dict
from sassha_tune.trial.objective import (
    build_spec,
    evaluate_params,
    evaluate_trials,
    outcome_from_result,
)

PACK_ATTRS = ("pack_size", "pack_index", "pack_oom_sizes")


def _config(optimizer: str = "sgd", **fixed: Any):
    return config_from_dict({
        "study": {"name": "evaluate-trials"},
        "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [16]}, "epochs": 3,
                 "batch_size": 64, "max_steps_per_epoch": 4},
        "optimizer": {"name": optimizer, "fixed": fixed},
        "metrics": {"subset_size": 64, "track_every": 2,
                    "budget": {"lambda_max_iters": 4, "trace_probes": 2, "sam_steps": 1}},
        "device": "cpu",
        "seed": 5,
    })


def _record(outcome: Any) -> dict[str, Any]:
    """Everything a trial stores but its clocks, as the storage would read it back."""
    history = [{k: v for k, v in h.items() if k != "track_seconds"} for h in outcome.history]
    return json.loads(json.dumps(untimed({
        "state": outcome.state, "values": outcome.values, "failure_reason": outcome.failure_reason,
        "attrs": outcome.attrs, "history": history,
    })))


def _trainer_directly(cfg, params: dict[str, Any]):
    """The expectation: the built-in trainer's lone run and the outcome assembled from its result."""
    from sassha_tune.training.trainer import train
    from sassha_tune.trial.measured import sharpness_during_training

    spec = build_spec(cfg, params, device="cpu", progress=False)
    result = train(spec, measure=sharpness_during_training(cfg))
    return outcome_from_result(cfg, spec, result, params=params)


def test_a_single_trial_is_the_trainers_lone_run_bit_for_bit():
    cfg, params = _config(weight_decay=1e-4), {"lr": 0.1}
    expected = _record(_trainer_directly(cfg, params))
    epochs, phases, told = [], [], []
    (outcome,) = evaluate_trials(
        cfg, [params], on_epoch=[lambda epoch, metrics: epochs.append(epoch) or False], device="cpu",
        progress=False, on_phase=lambda i, name: phases.append((i, name)),
        on_outcome=lambda i, o: told.append((i, o)))
    assert _record(outcome) == expected  # exact: floats compared with ==
    assert outcome.state == "complete" and [h["epoch"] for h in outcome.history] == [1, 2, 3]
    assert "track_lambda_max" in outcome.history[1]  # sharpness during training ran (epoch 2)
    assert not any(key in outcome.attrs for key in PACK_ATTRS)  # a lone trial is in no pack
    assert epochs == [1, 2, 3]
    assert phases == [(0, "sharpness")] * 2  # at epoch 2 and for the final measurement
    assert told == [(0, outcome)]
    # the one-trial form that ``sassha-tune train`` calls is the same function
    assert _record(evaluate_params(cfg, params, device="cpu", progress=False)) == expected


def test_k_trials_are_a_pack_whose_members_equal_their_lone_runs():
    # SASSHA packs with exact kernels by default: a member is bitwise its lone run on the CPU
    cfg = _config("sassha", lazy_hessian=2)
    members = [{"lr": 0.05, "rho": 0.05}, {"lr": 0.1, "rho": 0.1}]
    told: list[int] = []
    phases: list[tuple[int, str]] = []
    packed = evaluate_trials(cfg, members, device="cpu", on_outcome=lambda i, o: told.append(i),
                             on_phase=lambda i, name: phases.append((i, name)))
    assert sorted(told) == [0, 1]
    assert sorted(phases) == [(0, "sharpness"), (1, "sharpness")]  # each member's final measurement
    for i, (outcome, params) in enumerate(zip(packed, members, strict=True)):
        assert (outcome.attrs["pack_size"], outcome.attrs["pack_index"]) == (2, i)
        assert "pack_oom_sizes" not in outcome.attrs  # it did not run out of memory
        lone = _record(_trainer_directly(cfg, params))
        member = _record(outcome)
        for key in ("pack_size", "pack_index"):
            member["attrs"].pop(key)
        assert member == lone
