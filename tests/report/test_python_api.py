"""The notebook functions (issue 27): ``sassha_tune.report(...)``, ``sassha_tune.compare(...)`` and
``sassha_tune.export(...)`` write what the commands write and return it as Python objects;
``sassha_tune.report`` stays callable although it names the report package; ``trials_dataframe``
says in one line how to get pandas when it is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_config
from typer.testing import CliRunner

import sassha_tune
from sassha_tune.app.cli import app
from sassha_tune.errors import UserError

CFG = tiny_config("nb", budget={"n_trials": 2})


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nb")
    url = f"sqlite:///{folder}/nb.db"
    sassha_tune.run_study(CFG, storage=url, log=lambda _: None)
    sassha_tune.run_study({**CFG, "study": {**CFG["study"], "name": "nb2"}}, storage=url, log=lambda _: None)
    return url


def test_report_returns_what_it_wrote(url, tmp_path):
    lines: list[str] = []
    written = sassha_tune.report("nb", storage=url, out=tmp_path / "rep", log=lines.append)
    assert written.out_dir == tmp_path / "rep" and all(p.is_file() for p in written.files)
    assert {p.name for p in written.files} >= {"report.md", "summary.json", "report.html"}
    assert written.markdown == (tmp_path / "rep" / "report.md").read_text()
    assert written._repr_markdown_() == written.markdown  # Jupyter shows the report
    assert written.summary == json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert written.summary["counts"]["complete"] == 2
    headers, rows = written.tables["Best trials"]
    assert "val_acc" in headers and len(rows) == 2
    assert lines[-1].startswith("wrote ") and any(line.startswith("study nb (sgd)") for line in lines)


def test_compare_writes_compare_html_beside_compare_md(url, tmp_path):
    written = sassha_tune.compare(["nb", "nb2"], storage=url, out=tmp_path / "cmp", log=lambda _: None)
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert (tmp_path / "cmp" / "compare.html") in written.files and written.markdown.startswith("# Optimizer comparison")
    headers, rows = written.tables["Ranking by best validation accuracy"]
    names = [r[headers.index("study")] for r in rows]
    assert sorted(names) == ["nb", "nb2"] and all(f"<td>{n} " in page for n in names)
    assert page.count("data:image/png;base64,") == sum(p.suffix == ".png" for p in written.files) > 0
    result = CliRunner().invoke(app, ["compare", "nb", "nb2", "--storage", url, "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0 and "compare.html" in result.output and (tmp_path / "cli" / "compare.html").is_file()


def test_export_returns_the_config_the_command_prints(url, tmp_path):
    d = sassha_tune.export("nb", storage=url)
    printed = CliRunner().invoke(app, ["export", "nb", "--storage", url])
    assert printed.exit_code == 0 and d == yaml.safe_load(printed.output)
    kwargs = sassha_tune.export("nb", storage=url, format="kwargs", out=tmp_path / "k.json")
    assert kwargs == json.loads((tmp_path / "k.json").read_text()) and kwargs["class"] == "sassha_tune.SGD"
    with pytest.raises(UserError, match="format: expected yaml, json or kwargs"):
        sassha_tune.export("nb", storage=url, format="toml")
    with pytest.raises(UserError, match="model: give out=FILE"):
        sassha_tune.export("nb", storage=url, model=True)


def test_report_is_callable_whichever_is_imported_first(url, tmp_path):
    code = ("import sassha_tune.report.rows, sassha_tune\n"
            f"w = sassha_tune.report('nb', storage={url!r}, out={str(tmp_path / 'r')!r}, log=lambda _: None)\n"
            "from sassha_tune import report\n"
            "assert report is sassha_tune.report and w.summary['counts']['complete'] == 2\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_trials_dataframe_needs_pandas_and_says_so_in_one_line(url, monkeypatch):
    try:
        import pandas  # noqa: F401
    except ImportError:
        pass
    else:
        frame = sassha_tune.trials_dataframe("nb", storage=url)
        assert len(frame) == 2 and "user_attrs_val_acc" in frame.columns
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas fails, as where it is not installed
    with pytest.raises(UserError) as info:
        sassha_tune.trials_dataframe("nb", storage=url)
    assert "\n" not in str(info.value) and 'pip install -e ".[pandas]"' in str(info.value)
