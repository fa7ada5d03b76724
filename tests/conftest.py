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


@pytest.fixture
def small_tmpfs(tmp_path):
    """``mount(size) -> folder``: a real tmpfs of ``size`` (e.g. ``"400k"``), unmounted (lazily: a
    storage engine may still hold a file open) at the end; skips where mounting is not allowed."""
    import subprocess

    mounted = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill_disk(folder: Path) -> Path:
    """Write zeros to ``folder / "fill"`` until the file system is full; the file (to free it)."""
    fill = folder / "fill"
    try:
        with open(fill, "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
    except OSError:
        pass
    return fill


PG_HOST, PG_PORT, PG_DB = "127.0.0.1", 5432, "test"


def postgres_url() -> str:
    """The URL of the test PostgreSQL server (127.0.0.1:5432, database ``test``, trust auth as
    ``postgres`` or ``root``); skips the test when it is unreachable or psycopg is missing."""
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]')")
    errors = []
    for user in ("postgres", "root"):
        try:
            psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=PG_DB, connect_timeout=3).close()
            return f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{PG_DB}"
        except Exception as exc:  # unreachable server, unknown role, ...
            errors.append(f"{user}: {' '.join(str(exc).split())[:120]}")
    pytest.skip(f"PostgreSQL at {PG_HOST}:{PG_PORT}/{PG_DB} unreachable ({'; '.join(errors)})")


# Wall-clock values of a trial (attributes, epoch history entries): they differ from run to run.
TIMING_KEYS = ("train_seconds", "ms_per_step", "sharpness_seconds", "seconds")


def untimed(value):
    """``value`` (a trial's attributes, its history, ...) without the :data:`TIMING_KEYS`, at any depth."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def tiny_config(name: str, **sections: dict) -> dict:
    """A study config small enough for a test: MNIST-1D, an MLP with one hidden layer of 8, one
    epoch of two steps of 64, SGD, the CPU, seed 0, and every mechanism a test does not look at
    switched off (no pruner, nothing enqueued first, no sharpness). Each of ``sections`` is merged
    into its section key by key (``task={"epochs": 4}`` changes the epochs only)."""
    cfg: dict = {
        "study": {"name": name, "pruner": "none"},
        "budget": {"n_trials": 1},
        "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [8]}, "epochs": 1,
                 "batch_size": 64, "max_steps_per_epoch": 2},
        "optimizer": {"name": "sgd", "enqueue_published": False},
        "metrics": {"sharpness": False},
        "device": "cpu",
        "seed": 0,
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def write_config(folder: Path, cfg: dict, name: str | None = None) -> Path:
    """``cfg`` as a YAML file in ``folder`` (named after its study unless ``name`` is given)."""
    import yaml

    path = Path(folder) / f"{name or cfg['study']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def invoke_cli(*args, env: dict[str, str] | None = None):
    """The CLI in this process (Typer's runner), one thread per trial process as on CI."""
    from typer.testing import CliRunner

    from sassha_tune.app.cli import app

    return CliRunner(env={"OMP_NUM_THREADS": "1", **(env or {})}).invoke(app, [str(a) for a in args])


def cli_ok(*args, env: dict[str, str] | None = None):
    """``invoke_cli`` that must succeed (its output shown when it does not)."""
    result = invoke_cli(*args, env=env)
    assert result.exit_code == 0, result.output
    return result


def one_line_exit_2(result) -> str:
    """The promise for bad input: exit code 2 and one line, no traceback; that line."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def read_until(proc, text: str, timeout: float = 180) -> list[str]:
    """A running process's output lines up to and including the first holding ``text`` (its
    stdout a text pipe); fails when it takes longer than ``timeout`` s or the process ends first."""
    import time

    deadline = time.monotonic() + timeout
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line.rstrip("\n"))
        if text in line:
            return seen
        assert time.monotonic() < deadline, f"no {text!r} in time: {seen}"
    raise AssertionError(f"process ended before {text!r}: {seen}")


def in_fresh_process(code: str, timeout: float = 300) -> None:
    """Run ``code`` in a fresh Python process (this one's imports and torch settings are the earlier
    tests'); it must exit 0: its assertions fail the test with its stderr."""
    import subprocess

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr
