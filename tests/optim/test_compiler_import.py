"""Config validation builds dummy optimizers in the study's coordinator, which never trains: it
must not import torch's compiler (``torch._dynamo``: about 1.5 s of CPU time at import, 0.7 s at
exit), and it leaves torch's wrapper as it found it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"


def test_validating_a_config_does_not_import_the_compiler():
    code = (
        "import sys, torch\n"
        "from sassha_tune.config import load_config\n"
        f"load_config({str(QUICKSTART)!r})\n"
        "assert 'torch._dynamo' not in sys.modules, 'validation imported torch._dynamo'\n"
        "assert not hasattr(torch.optim.Optimizer.add_param_group.__wrapped__, '__dynamo_disable')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
