"""Atomic writes: a failed write leaves the old file and no temporary; files get the usual mode."""

import os
import stat

import pytest

from cilkit import io


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    io.write_json(target, {"top1": 1.0})

    def half_then_crash(p):
        p.write_text('{"top1": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(target, half_then_crash)
    assert target.read_text() == '{\n  "top1": 1.0\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = io.write_text(tmp_path / "table.md", "| a |\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
