"""Passwords never shown: in a URL's user part or its query, in any command's output, error or
report, whatever type the storage value had."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.redact import mask_url, scrub

SECRET = "hunter2xyz"


@pytest.mark.parametrize("url", [
    f"postgresql://u:{SECRET}@127.0.0.1:1/db",
    f"postgresql+psycopg://u@127.0.0.1:1/db?password={SECRET}",
    f"postgresql+psycopg://127.0.0.1:1/db?sslmode=disable&password={SECRET}&connect_timeout=1",
    f"postgresql://127.0.0.1:1/db?sslpassword={SECRET}",
    f"mysql+pymysql://root@127.0.0.1:1/test?passwd={SECRET}",
    f"postgresql://u:{SECRET}@127.0.0.1:1/db?token={SECRET}",
    f"not a url at all password={SECRET}",
])
def test_mask_url_hides_every_password(url):
    assert SECRET not in mask_url(url)
    assert SECRET not in scrub(f"cannot connect to {url}: bad password {SECRET}", url)


def test_mask_url_keeps_what_is_not_secret():
    assert mask_url("sqlite:///studies.db") == "sqlite:///studies.db"
    assert mask_url("postgresql://u@h:5432/db?sslmode=require") == "postgresql://u@h:5432/db?sslmode=require"


@pytest.mark.parametrize("args", [
    ["status"], ["status", "x"], ["resume", "x"], ["export", "x"], ["report", "x"],
])
def test_query_string_passwords_never_appear_in_commands(args):
    url = f"postgresql+psycopg://u@127.0.0.1:1/db?connect_timeout=1&password={SECRET}"
    result = CliRunner().invoke(app, [*args, "--storage", url])
    assert result.exit_code == 2
    assert SECRET not in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("storage", [
    [f"postgresql://u:{SECRET}@h/db"], {"url": f"postgresql://u:{SECRET}@h/db"}, f"postgresql://u:{SECRET}@h/db\n",
])
def test_a_storage_of_the_wrong_type_is_not_echoed(tmp_path, monkeypatch, storage):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"study": {"name": "m", "storage": storage},
                                   "task": {"dataset": "mnist1d", "model": "mlp"}, "optimizer": {"name": "sassha"}}))
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2 and "study.storage" in result.stderr
    assert SECRET not in result.output
