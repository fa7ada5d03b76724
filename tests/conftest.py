"""Shared test settings: CPU, deterministic, small.

One thread everywhere: in this process and in every trial, pack and rank process the tests start
(they inherit ``OMP_NUM_THREADS``). CPU reductions split their work by the thread count, so a
value computed here and the same value computed in a child process agree bitwise only when both
use the same count; several tests compare exactly that.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
