"""Config validation builds dummy optimizers in the study's coordinator, which never trains, and every
trial process builds its optimizers: neither may import torch's compiler (``torch._dynamo``: about
1.5 s of CPU time at import, 0.7 s at exit, which a trial's first optimizer used to pay), and both
leave torch's wrapper as they found it (optim/registry.py, ``OptimizerInfo.build``)."""

from __future__ import annotations

from pathlib import Path

from conftest import in_fresh_process

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"


def test_validating_a_config_does_not_import_the_compiler():
    code = (
        "import sys, torch\n"
        "from sassha_tune.config import load_config\n"
        f"load_config({str(QUICKSTART)!r})\n"
        "assert 'torch._dynamo' not in sys.modules, 'validation imported torch._dynamo'\n"
        "assert not hasattr(torch.optim.Optimizer.add_param_group.__wrapped__, '__dynamo_disable')\n"
    )
    in_fresh_process(code)


def test_a_trial_trains_and_measures_sharpness_without_importing_the_compiler():
    code = (
        "import sys, torch\n"
        "from sassha_tune.config import load_config\n"
        "from sassha_tune.trial.objective import evaluate_params\n"
        f"cfg = load_config({str(QUICKSTART)!r}, ['task.epochs=1', 'task.max_steps_per_epoch=3'])\n"
        "outcome = evaluate_params(cfg, {'lr': 0.1, 'weight_decay': 1e-4, 'rho': 0.05})\n"
        "assert outcome.state == 'complete' and outcome.attrs['lambda_max'] > 0, outcome\n"
        "assert 'torch._dynamo' not in sys.modules, 'the trial imported torch._dynamo'\n"
        "assert not hasattr(torch.optim.Optimizer.add_param_group.__wrapped__, '__dynamo_disable')\n"
    )
    in_fresh_process(code)
