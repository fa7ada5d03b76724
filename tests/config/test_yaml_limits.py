"""Hostile YAML: bounded size, depth and alias expansion; errors show only a short excerpt."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.config.yamlfile import MAX_BYTES, MAX_DEPTH

GOOD = """study: {name: y}
task: {dataset: mnist1d, model: mlp, epochs: 1}
optimizer: {name: sassha}
"""


def _refused(tmp_path, text: str | bytes, *fragments: str, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.monotonic()
    result = CliRunner().invoke(app, ["run", str(path), "--storage", f"sqlite:///{tmp_path / 's.db'}"])
    assert time.monotonic() - start < 20
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert len(lines[0]) < 600 + len(str(tmp_path))
    assert not (tmp_path / "s.db").exists()
    return lines[0]


def test_a_billion_laughs_is_refused_quickly(tmp_path, monkeypatch):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    text = GOOD.replace("optimizer: {name: sassha}", "optimizer: {name: sassha, fixed: {lr: *a9}}")
    _refused(tmp_path, "\n".join(lines) + "\n" + text, "expands to more than", monkeypatch=monkeypatch)


def test_a_recursive_alias_is_refused(tmp_path, monkeypatch):
    text = GOOD + "provenance: &p {self: *p}\n"
    _refused(tmp_path, text, "refused", monkeypatch=monkeypatch)


@pytest.mark.parametrize("style", ["flow", "block"])
def test_deep_nesting_is_refused(tmp_path, monkeypatch, style):
    depth = 3000 if style == "flow" else 600
    if style == "flow":
        deep = "[" * depth + "]" * depth
    else:
        deep = "\n" + "".join(f"{' ' * (2 * i)}k{i}:\n" for i in range(depth)) + " " * (2 * depth) + "1"
    _refused(tmp_path, GOOD + f"provenance: {{x: {deep}}}\n" if style == "flow" else GOOD + "provenance:" + deep + "\n",
             "deeper than" if style == "block" or depth > MAX_DEPTH else "", monkeypatch=monkeypatch)


def test_a_config_above_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    _refused(tmp_path, GOOD + "#" * (MAX_BYTES + 10) + "\n", "too large", monkeypatch=monkeypatch)


def test_a_search_space_pointing_at_a_large_file_is_refused(tmp_path, monkeypatch):
    big = tmp_path / "big.yaml"
    big.write_text("x: " + "y" * (MAX_BYTES + 10) + "\n")
    _refused(tmp_path, GOOD.replace("{name: sassha}", f"{{name: sassha, search_space: {big}}}"), "too large",
             monkeypatch=monkeypatch)


def test_a_search_space_pointing_at_an_unrelated_file_shows_an_excerpt(tmp_path, monkeypatch):
    other = tmp_path / "notes.yaml"
    other.write_text("SECRET-LINE " * 5000 + "\n")
    line = _refused(tmp_path, GOOD.replace("{name: sassha}", f"{{name: sassha, search_space: {other}}}"),
                    "expected a mapping", monkeypatch=monkeypatch)
    assert line.count("SECRET-LINE") <= 5


def test_a_binary_search_space_is_refused(tmp_path, monkeypatch):
    other = tmp_path / "blob.yaml"
    other.write_bytes(bytes(range(256)) * 10)
    _refused(tmp_path, GOOD.replace("{name: sassha}", f"{{name: sassha, search_space: {other}}}"),
             "UTF-8", monkeypatch=monkeypatch)
