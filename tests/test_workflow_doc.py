"""docs/workflow.md runs as written (issue 27): a new user's walk from ``init`` through ``run --set``,
``report``, ``rerun`` and ``export --model`` to the weights loaded in plain PyTorch, whose test
accuracy must be the stored one exactly (its ``python`` block asserts it). The page's ``bash``
blocks run in order with the real CLI in an empty folder, then its ``python`` blocks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "workflow.md").read_text(encoding="utf-8")
BASH = re.findall(r"^```bash\n(.*?)^```$", PAGE, re.S | re.M)
PYTHON = re.findall(r"^```python\n(.*?)^```$", PAGE, re.S | re.M)

pytestmark = pytest.mark.slow


def test_the_walk_runs_as_written(tmp_path):
    assert len(BASH) >= 4 and len(PYTHON) == 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SASSHA_TUNE_PLAIN": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("SASSHA_TUNE_STORAGE", None)
    script = "set -euo pipefail\n" + "\n".join(BASH)
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "seeds 1, 2, 3 enqueued" in result.stdout

    url = f"sqlite:///{tmp_path}/sassha-tune.db"
    seeds = optuna.load_study(study_name="first-seeds", storage=url).trials
    assert sorted(t.user_attrs["seed"] for t in seeds) == [1, 2, 3] and all(t.state.name == "COMPLETE" for t in seeds)
    report = (tmp_path / "reports" / "first" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| first ") and "±" in line)
    assert re.search(r"\| 3 +\| 0 +\|", row) and row.count("[") == 2  # 3 seeds, none failed, two intervals
    assert (tmp_path / "best.pt").is_file() and any((tmp_path / "sassha-tune-artifacts").iterdir())

    result = subprocess.run([sys.executable, "-c", PYTHON[0]], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr  # the block asserts accuracy == stored
    assert re.fullmatch(r"test accuracy (\S+) \(\d+/\d+\), stored \1\n", result.stdout), result.stdout
