"""The package as a whole: no import cycle among its modules (static: every ``import`` counts,
inside functions too, since a lazy import that closes a cycle is still a cycle in the design), no
module using another module's private names, and importing it (as a library) changes nothing
about Optuna's logging, while the CLI keeps Optuna's INFO lines out of its output."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


PACKAGE = ROOT / "sassha_tune"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its code). Importing ``a.b.c`` from
    outside the package ``a.b`` also imports ``a.b`` (Python runs its ``__init__`` first); from
    inside it, the package is already being imported."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    packages = {name for name, p in files.items() if p.name == "__init__.py"}
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        here = name if name in packages else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                found = [module] + [f"{module}.{a.name}" for a in node.names]
            for target in found:
                while target and target.split(".")[0] == top:
                    if target in files:
                        targets.add(target)
                    target = target.rpartition(".")[0]
                    if name == target or name.startswith(target + "."):
                        break  # the importer's own package
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_detector_finds_a_cycle_through_a_lazy_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from . import c\n")
    found = cycles(import_graph(pkg))
    assert found == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_no_import_cycles_among_sassha_tune_modules():
    graph = import_graph(PACKAGE)
    assert "sassha_tune.config.overrides" in graph["sassha_tune.config.validate"]  # the graph sees function-level imports
    assert cycles(graph) == []


# Who may import whom (docs/architecture.md): a package imports only from its own layer and the
# layers below, with no exception.
LAYERS = [
    # foundation; the package's __init__ imports nothing but the version: its public names are
    # loaded on first use (PEP 562) from the modules that define them
    {"sassha_tune", "version", "errors", "devices", "plugins", "provenance", "distributed", "redact", "printable"},
    {"optim"},
    {"metrics"},
    {"training"},
    {"config"},
    {"trial"},
    {"study"},
    {"report"},
    {"app", "__main__"},  # the API (run_study, ...), the CLI on top of it and its live study view
]


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "sassha_tune"
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_packages_import_only_their_own_layer_and_below():
    graph = import_graph(PACKAGE)
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if _layer(b) > _layer(a))
    assert upward == []
    assert {_layer(m) for m in graph} == set(range(len(LAYERS)))  # every layer is a real package


def test_the_cli_calls_only_the_app_layer():
    """The command line parses, calls the app layer (api, starter, results, flags, outputs,
    status, train, the live view) and prints: it imports nothing of the layers below the app but
    the foundation (errors, printable, version, ...)."""
    graph = import_graph(PACKAGE)
    below = ("config", "study", "trial", "training", "report", "optim", "metrics")
    reached = sorted(m for m in graph["sassha_tune.app.cli"] if m.split(".")[1] in below)
    assert reached == []
    assert "sassha_tune.app.api" in graph["sassha_tune.app.cli"]  # the graph sees its function-level imports
    assert "sassha_tune.study.storage" in graph["sassha_tune.app.api"]  # and would see a reach below


def test_no_module_uses_another_modules_private_names():
    """``from x import _name`` / ``module._name`` across the package's own modules: a module's
    private names are its own (Optuna's and torch's private attributes are not checked here)."""
    files = {_module_name(p, PACKAGE): p for p in PACKAGE.rglob("*.py")}
    offenders = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("sassha_tune")):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{name}: from {'.' * node.level}{node.module or ''} import {alias.name}")
                    own_modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("sassha_tune"):
                        own_modules.add(alias.asname or alias.name.split(".")[0])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in own_modules):
                offenders.append(f"{name}: {node.value.id}.{node.attr}")
    assert offenders == []


def _python(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_validating_a_config_does_not_import_the_study_loop_or_the_trial():
    _python(
        "import sys\n"
        "from sassha_tune.config import config_from_dict\n"
        "config_from_dict({'study': {'name': 'x', 'pruner': 'median'}, 'task': {'dataset': 'mnist1d', 'model': 'mlp'},"
        " 'optimizer': {'name': 'sassha'}})\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('sassha_tune.study', 'sassha_tune.trial')))\n"
        "assert loaded == [], loaded\n"
    )


def test_importing_the_package_leaves_optuna_logging_alone(tmp_path):
    db = tmp_path / "none.db"
    _python(
        "import optuna\n"
        "optuna.logging.set_verbosity(optuna.logging.DEBUG)\n"
        "import sassha_tune.app.cli, sassha_tune.report, sassha_tune.study.loop, sassha_tune.study.views\n"
        "import sassha_tune.trial.child, sassha_tune.trial.objective\n"
        "assert optuna.logging.get_verbosity() == optuna.logging.DEBUG\n"
        "from typer.testing import CliRunner\n"
        f"result = CliRunner().invoke(sassha_tune.app.cli.app, ['status', '--storage', 'sqlite:///{db}'])\n"
        "assert result.exit_code == 2, result.output  # no such database file\n"
        "assert optuna.logging.get_verbosity() == optuna.logging.WARNING  # a command quiets Optuna\n"
    )
