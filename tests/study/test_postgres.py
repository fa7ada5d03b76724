"""Two `worker` processes share one study on PostgreSQL (127.0.0.1:5432, database `test`)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import postgres_url
from optuna.trial import TrialState

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CONFIG = {
    "study": {"heartbeat_interval": 0.5, "stale_after": 5},
    "budget": {"n_trials": 4},
    "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [16]}, "epochs": 1,
             "batch_size": 64, "max_steps_per_epoch": 3},
    "optimizer": {"name": "sgd"},
    "metrics": {"subset_size": 128, "budget": {"lambda_max_iters": 4, "trace_probes": 2, "sam_steps": 1}},
    "device": "cpu",
}


def test_two_workers_share_one_study(tmp_path: Path):
    url = postgres_url()
    name = f"pg-{uuid.uuid4().hex[:10]}"
    cfg = {**CONFIG, "study": {**CONFIG["study"], "name": name}}
    path = tmp_path / "pg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "sassha_tune.app.cli"]
    try:
        subprocess.run([*cli, "run", str(path), "--storage", url, "--create-only"], env=env, check=True,
                       capture_output=True, timeout=120)
        workers = [
            subprocess.Popen([*cli, "worker", name, "--storage", url, "--worker-id", str(i)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)
        ]
        outputs = [w.communicate(timeout=300)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outputs
        trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        assert len(complete) == 4
        assert len({t.number for t in complete}) == 4
        assert len({tuple(sorted(t.params.items())) for t in complete}) == 4  # distinct parameter sets
        ran = [sum("COMPLETE" in line for line in out.splitlines()) for out in outputs]
        assert sum(ran) >= 4 and all(r >= 1 for r in ran), outputs  # both workers did work
    finally:
        try:
            optuna.delete_study(study_name=name, storage=url)
        except KeyError:
            pass
