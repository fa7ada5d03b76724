"""Report files are replaced atomically: the old file survives a failed write, no temporary file
is left behind; on a real full disk (a small tmpfs, where the machine allows mounting one)."""

from __future__ import annotations

import pytest

from sassha_tune.report.files import replaced, write_text


def test_write_text_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old", encoding="utf-8")
    write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(RuntimeError, match="figure failed"), replaced(path) as tmp:
        tmp.write_text('{"half": ', encoding="utf-8")
        raise RuntimeError("figure failed")
    assert path.read_text(encoding="utf-8") == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_full_disk_keeps_the_old_report(small_tmpfs):
    mnt = small_tmpfs("64k")
    path = mnt / "report.md"
    write_text(path, "the old report\n")
    with pytest.raises(OSError):
        write_text(path, "x" * 200_000)  # more than the disk holds
    assert path.read_text(encoding="utf-8") == "the old report\n"
    assert sorted(p.name for p in mnt.iterdir()) == ["report.md"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_permissions_the_umask_allows(tmp_path, umask, mode):
    """A shared report must be readable by teammates and a web server when the umask says so."""
    import os
    import stat

    old = os.umask(umask)
    try:
        write_text(tmp_path / "report.md", "new")
        with replaced(tmp_path / "figure.png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
    for name in ("report.md", "figure.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
