"""Shared test settings: CPU, deterministic, small. The tests mirror the package (tests/optim for
sassha_tune/optim, ...); test file names are unique across folders.

One thread everywhere: in this process and in every trial, pack and rank process the tests start
(they inherit ``OMP_NUM_THREADS``). CPU reductions split their work by the thread count, so a
value computed here and the same value computed in a child process agree bitwise only when both
use the same count; several tests compare exactly that.
"""

import os
import sys
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

# The test plug-ins (plugins_example.py) are importable here and in every child process, whichever
# folder a test lives in.
TESTS = str(Path(__file__).resolve().parent)
sys.path.insert(0, TESTS)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
