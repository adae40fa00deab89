"""Atomic writes: a failed write leaves the old file and no temporary; files get the usual mode.
A damaged results.json is refused naming the file and the key."""

import json
import os
import stat

import pytest

from cilkit.common import io
from cilkit.cli import main


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


def _results() -> dict:
    """A minimal results.json of one state (no scores needed: it is refused before they are read)."""
    state = {"state": 0, "classes_seen": 4, "new_classes": 4, "top1": 50.0, "top1_old": None, "top1_new": 50.0,
             "new_class_share": 100.0, "variants": {"cnn": {"top1": 40.0}}}
    return {"version": 1, "method": "finetune", "state_ends": [4], "class_order": [0, 1, 2, 3], "states": [state],
            "calibration": {"rectifier": "il2m"}, "provenance": {"cilkit": "0"}}


def _damage(results: dict, key: str, value) -> dict:
    *parents, last = key.replace("[0]", ".0").split(".")
    node = results
    for k in parents:
        node = node[int(k)] if k.isdigit() else node[k]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return results


@pytest.mark.parametrize("key, value, message", [
    ("states[0]", 7, "'states[0]' is not an object"),
    ("states[0].variants", ["cnn"], "'states[0].variants' is not an object"),
    ("states[0].variants.cnn", 40.0, "'states[0].variants.cnn' is not an object"),
    ("state_ends", "4", "'state_ends' is not a list"),
    ("class_order", {"0": 3}, "'class_order' is not a list"),
    ("calibration", "il2m", "'calibration' is not an object"),
    ("provenance", ["cilkit"], "'provenance' is not an object"),
])
def test_a_damaged_results_file_is_refused_naming_it_and_the_key(tmp_path, capsys, key, value, message):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "results.json"
    path.write_text(json.dumps(_damage(_results(), key, value)))
    assert main(["compare", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"'{path}' is damaged: {message}" in err and err.count("\n") == 1
    assert not (run / "report").exists()
