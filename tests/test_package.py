"""The package as a whole: no import cycle among its modules, and importing it (as a library)
changes nothing about Optuna's logging, while the CLI keeps Optuna's INFO lines out of its output."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sassha_tune"


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in it (inside functions too). Importing
    ``a.b.c`` runs ``a`` and ``a.b`` first, so those count as imported as well."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, (path, is_package) in modules.items():
        here = module.split(".") if is_package else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    # a package's own parents are already running when it imports a sibling
                    if name in modules and name != module and not module.startswith(name + "."):
                        graph[module].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_the_modules():
    graph = _import_graph()
    assert "sassha_tune.study.samplers" in graph["sassha_tune.config"]  # the graph sees function-level imports
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]  # and the check finds one


def _python(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_validating_a_config_does_not_import_the_study_loop_or_the_trial():
    _python(
        "import sys\n"
        "from sassha_tune.config import config_from_dict\n"
        "config_from_dict({'study': {'name': 'x', 'pruner': 'median'}, 'task': {'dataset': 'mnist1d', 'model': 'mlp'},"
        " 'optimizer': {'name': 'sassha'}})\n"
        "assert 'sassha_tune.study.samplers' in sys.modules\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('sassha_tune.study.', 'sassha_tune.trial')))\n"
        "assert loaded == ['sassha_tune.study.samplers'], loaded\n"
    )


def test_importing_the_package_leaves_optuna_logging_alone(tmp_path):
    db = tmp_path / "none.db"
    _python(
        "import optuna\n"
        "optuna.logging.set_verbosity(optuna.logging.DEBUG)\n"
        "import sassha_tune.cli, sassha_tune.report, sassha_tune.study.loop, sassha_tune.study.views\n"
        "import sassha_tune.trial.child, sassha_tune.trial.objective\n"
        "assert optuna.logging.get_verbosity() == optuna.logging.DEBUG\n"
        "from typer.testing import CliRunner\n"
        f"result = CliRunner().invoke(sassha_tune.cli.app, ['status', '--storage', 'sqlite:///{db}'])\n"
        "assert result.exit_code == 2, result.output  # no such database file\n"
        "assert optuna.logging.get_verbosity() == optuna.logging.WARNING  # a command quiets Optuna\n"
    )
