"""Directories, paths read from files, journals and locks (issue 37 items 4, 5, 9, 15, 16):

- item 4: ``--overwrite`` removes only the sub-runs the replaced run's marker lists; a run moved
  inside it (at the top, or inside one of its sub-runs) is refused in one line, never removed;
- item 5: a path read from a file (a tune journal's trial ``dir``: ``../../escaped2``, an absolute
  path, a link out; a run marker's ``sub_runs``) must lie inside the directory owning the file;
- item 9: a damaged Optuna journal: a cut-off last record is dropped with a warning (the file as
  it was kept) and the study continues; a garbage line, an empty line or a binary file is one line;
- item 15: ``--resume`` takes the run's lock before reading anything: a run held by another
  process (mid ``--overwrite``) is one line saying so;
- item 16: ``--out LINK`` (with or without ``--overwrite``) is one line saying it is a link,
  nothing removed on either side of it.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import one_line_error, snapshot, tiny_config, tiny_dict

from cilkit.cli import main
from cilkit.common.errors import UserError
from cilkit.common.io import path_inside
from cilkit.rundir.layout import RUN_MARKER, clear_run, sub_run_names
from cilkit.runs.jobs import plan
from cilkit.runs.multirun import run_methods
from cilkit.runs.tune import TUNE_MARKER, tune_identity


def _config_file(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tiny_dict(tmp_path), "threads": 1, "train": {"epochs": 1},
                                    "scenario": {"initial": 4, "increment": 3, "states": 2}, **extra}))
    return path


def _tiny_run(tmp_path: Path, out: Path, *overrides: str) -> Path:
    run_methods(tiny_config(tmp_path, "threads=1", "train.epochs=1", "scenario.states=2", *overrides), out,
                progress=False)
    return out


# ----- item 4: --overwrite removes only the runs it made ----------------------------------------------
def test_overwrite_refuses_a_run_moved_inside_the_run_it_replaces(tmp_path, capsys):
    """issue 37 item 4: ``cilkit run --out x; mv x outer/inner; cilkit run --out outer --overwrite``
    removed outer/inner. Now one line naming outer/inner, and both runs are left byte for byte."""
    outer = _tiny_run(tmp_path, tmp_path / "outer")
    inner = _tiny_run(tmp_path, tmp_path / "x").rename(outer / "inner")
    before = snapshot(outer)
    err = one_line_error(capsys, ["run", str(_config_file(tmp_path)), "--out", str(outer), "--overwrite"])
    assert str(outer / "inner") in err and "nothing was removed" in err
    assert snapshot(outer) == before and (inner / "results.json").is_file()


def test_overwrite_of_a_comparison_keeps_a_run_moved_into_one_of_its_sub_runs(tmp_path, capsys):
    """issue 37 item 4, a run moved one level deeper: into a method's sub-run of a comparison
    (``outer/finetune/inner``), and a run moved in under a method's name (``outer/lwf`` of a
    comparison of finetune and icarl): refused, never removed."""
    outer = _tiny_run(tmp_path, tmp_path / "outer", "method=[finetune,icarl]")
    _tiny_run(tmp_path, tmp_path / "x").rename(outer / "finetune" / "inner")
    before = snapshot(outer)
    config = str(_config_file(tmp_path, method=["finetune", "icarl"]))
    err = one_line_error(capsys, ["run", config, "--out", str(outer), "--overwrite"])
    assert str(outer / "finetune" / "inner") in err
    assert snapshot(outer) == before
    (outer / "finetune" / "inner").rename(outer / "lwf")
    err = one_line_error(capsys, ["run", config, "--out", str(outer), "--overwrite"])
    assert str(outer / "lwf") in err and (outer / "lwf" / "results.json").is_file()


def test_overwrite_still_removes_the_sub_runs_the_marker_lists(tmp_path):
    """issue 37 item 4, what must still go: the comparison's own sub-runs (every seed of every
    method) are removed by clearing it; the marker lists them as jobs.plan lays them out."""
    config = tiny_config(tmp_path, "method=[finetune,icarl]", "runs=2")
    outer = tmp_path / "outer"
    for job in plan(config, outer):
        job.run_dir.mkdir(parents=True)
        (job.run_dir / RUN_MARKER).write_text(json.dumps({"config": job.config}))
    (outer / RUN_MARKER).write_text(json.dumps({"config": config.to_dict(),
                                                "sub_runs": sub_run_names(config.to_dict())}))
    (outer / "notes.txt").write_text("mine")
    clear_run(outer)
    assert sorted(p.name for p in outer.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("overrides", [[], ["runs=3"], ["method=[finetune,icarl]"], ["method=[finetune,icarl]", "runs=2"]])
def test_the_marker_lists_the_directories_jobs_plan_makes(tmp_path, overrides):
    """issue 37 item 4: the sub-runs a marker lists are the run directories of the plan (and the
    method folders holding them), computed independently by cilkit.runs.jobs.plan."""
    config = tiny_config(tmp_path, *overrides)
    out = tmp_path / "o"
    expected = {str(j.run_dir.relative_to(out)) for j in plan(config, out)} - {"."}
    expected |= {str(Path(name).parent) for name in expected} - {"."}
    assert set(sub_run_names(config.to_dict())) == expected


# ----- item 5: a path read from a file stays inside its owner -----------------------------------------
def _search_args(config: Path, out: Path) -> list[str]:
    return ["tune", str(config), "--search", "random", "--trials", "1", "--grid", "train.lr=0.01,0.02",
            "--set", "scenario.val_per_class=5", "--out", str(out)]


def _study(out: Path, config: Path):
    """A tune's --out as a tune with one trial asked leaves it: the marker and the journal."""
    optuna = pytest.importorskip("optuna")
    out.mkdir()
    (out / TUNE_MARKER).write_text(json.dumps(tune_identity(str(config), {"train.lr": ["0.01", "0.02"]})
                                              | {"search": "random", "ranges": {}}))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    return optuna.create_study(study_name="cilkit-tune", storage=storage, direction="maximize")


@pytest.mark.parametrize("stored", ["../../escaped2", "ABSOLUTE"])
def test_a_journal_cannot_send_a_trial_outside_the_tune(tmp_path, capsys, stored):
    """issue 37 item 5: a trial's ``dir`` in the journal edited to ``../../escaped2`` or to an
    absolute path elsewhere: one line naming the journal and the value, exit 2, nothing made
    there."""
    optuna = pytest.importorskip("optuna")
    config, out = _config_file(tmp_path), tmp_path / "deep" / "t"
    out.parent.mkdir()
    target = tmp_path / "escaped2" if stored == "ABSOLUTE" else (out / stored).resolve()
    value = str(target) if stored == "ABSOLUTE" else stored
    study = _study(out, config)
    trial = study.ask({"train.lr": optuna.distributions.CategoricalDistribution(["0.01", "0.02"])})
    trial.set_user_attr("dir", value)
    err = one_line_error(capsys, _search_args(config, out))
    assert str(out / "study.journal") in err and value in err and "outside" in err
    assert not target.exists()


def test_a_path_read_from_a_file_must_lie_inside_its_owner(tmp_path):
    """issue 37 item 5, the helper every stored path goes through: inside is taken (``a/../b``
    folded), leaving through ``..``, an absolute path or a link is refused naming the file."""
    owner = tmp_path / "owner"
    (owner / "b").mkdir(parents=True)
    (owner / "out").symlink_to(tmp_path, target_is_directory=True)
    source = owner / "index.json"
    assert path_inside(owner, "a/../b", source, "the entry").resolve() == (owner / "b").resolve()
    assert path_inside(owner, str(owner / "b" / "c"), source, "the entry") == owner / "b" / "c"
    for value in ["..", "../x", "/etc", "out/x", ".", "", None, 3]:
        with pytest.raises(UserError, match="index.json"):
            path_inside(owner, value, source, "the entry")


def test_a_marker_listing_a_sub_run_outside_is_refused(tmp_path, capsys):
    """issue 37 item 5, the run marker's sub-run list: an entry leading outside the run is one
    line naming the marker, and nothing is removed there."""
    outer = _tiny_run(tmp_path, tmp_path / "outer")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    marker = json.loads((outer / RUN_MARKER).read_text())
    (outer / RUN_MARKER).write_text(json.dumps(marker | {"sub_runs": ["../elsewhere"]}))
    err = one_line_error(capsys, ["run", str(_config_file(tmp_path)), "--out", str(outer), "--overwrite"])
    assert RUN_MARKER in err and "../elsewhere" in err
    assert (elsewhere / "keep.txt").read_text() == "mine"


# ----- item 9: a damaged journal -----------------------------------------------------------------------
def _journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]


@pytest.mark.parametrize("lock_left", [True, False])
def test_a_journal_cut_off_mid_record_is_repaired_and_the_study_continues(tmp_path, capsys, lock_left):
    """issue 37 item 9: what a kill during an append leaves (a last record without its end of
    line, with or without Optuna's lock link; Optuna would glue its next record onto the cut-off
    one, then fail to read its own journal): one warning, the damaged file kept byte for byte,
    the study continues (one trial run and ranked) and its journal reads back whole."""
    pytest.importorskip("optuna")
    config, out = _config_file(tmp_path), tmp_path / "t"
    _study(out, config)
    journal = out / "study.journal"
    whole = journal.read_bytes()
    damaged = whole + b'{"op_code":4,"worker_id":"0a1b-2c3d","study_id":0,"datetime_st'
    journal.write_bytes(damaged)
    if lock_left:
        (out / "study.journal.lock").symlink_to(journal)
    capsys.readouterr()
    assert main(_search_args(config, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("cut-off record") == 1
    assert (out / "study.journal.damaged").read_bytes() == damaged
    assert journal.read_bytes().startswith(whole)
    assert len(_journal_lines(journal)) > whole.count(b"\n")  # every line a record, the trial's appended
    assert len(json.loads((out / "ranking.json").read_text())["ranking"]) == 1


@pytest.mark.parametrize("damage", ["garbage", "empty", "binary", "binary-one-line"])
def test_a_journal_with_a_bad_line_is_one_line_naming_it(tmp_path, capsys, damage):
    """issue 37 item 9: a garbage line before the last, an empty line, a binary file (with and
    without line ends): one line naming the journal and the line, exit 2, the file untouched."""
    config, out = _config_file(tmp_path), tmp_path / "t"
    _study(out, config)
    journal = out / "study.journal"
    lines = journal.read_bytes().split(b"\n")[:-1]
    content, line = {
        "garbage": (b"\n".join([lines[0], b"this is not json", *lines[1:]]) + b"\n", 2),
        "empty": (b"\n".join([*lines, b"", lines[-1]]) + b"\n", len(lines) + 1),
        "binary": (bytes(range(256)) * 4, 1),
        "binary-one-line": (b"\x89PNG\r\x1a\x00\x00\x00IHDR", 1),
    }[damage]
    journal.write_bytes(content)
    err = one_line_error(capsys, _search_args(config, out))
    assert str(journal) in err and f"line {line}" in err
    assert journal.read_bytes() == content and not (out / "study.journal.damaged").exists()


# ----- item 15: --resume takes the lock first -------------------------------------------------------------
def test_resume_of_a_run_another_process_holds_says_so(tmp_path, capsys):
    """issue 37 item 15: ``--resume`` racing ``--out ... --overwrite``: while the other process
    holds the run's lock (here: in the middle of clearing the old run: config.yaml already gone),
    the resume says in one line that another process holds the run, and touches nothing."""
    run = _tiny_run(tmp_path, tmp_path / "r")
    with open(run / ".cilkit.lock", "a") as held:  # another process's flock on the run's lock file
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        for name in ("config.yaml", "results.json"):
            (run / name).unlink()
        before = snapshot(run)
        err = one_line_error(capsys, ["run", "--resume", str(run)])
        assert "another process holds" in err and str(run) in err
        assert snapshot(run) == before


# ----- item 16: --out LINK ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [["--overwrite"], []])
def test_out_that_is_a_symlink_is_never_followed(tmp_path, capsys, overwrite):
    """issue 37 item 16: ``--out LINK --overwrite`` (and without --overwrite), the link to a run
    or dangling: one line saying it is a symbolic link, nothing removed on either side."""
    run = _tiny_run(tmp_path, tmp_path / "r")
    before = snapshot(run)
    link, dangling = tmp_path / "link", tmp_path / "dangling"
    link.symlink_to(run, target_is_directory=True)
    dangling.symlink_to(tmp_path / "nowhere")
    for out in (link, dangling):
        err = one_line_error(capsys, ["run", str(_config_file(tmp_path)), "--out", str(out), *overwrite])
        assert "symbolic link" in err and str(out) in err
        assert out.is_symlink()
    assert snapshot(run) == before and not (tmp_path / "nowhere").exists()
    assert os.readlink(link) == str(run)
