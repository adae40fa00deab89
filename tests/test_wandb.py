"""Weights & Biases tracking (log.wandb): what an offline run's record log holds, read back with
wandb's own record type."""

import json
import struct
import sys

import pytest
import yaml
from helpers import one_error_line, tiny_config

from cilkit.cli import main
from cilkit.cil.memory import Memory
from cilkit.run.loop import Run

BLOCK = 32768  # the .wandb file is a LevelDB log: 32 KiB blocks of records with a 7-byte header
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class Killed(Exception):
    """Stands for a run killed in the middle of a state."""


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """wandb quiet, offline, and everything it writes outside the run inside tmp_path."""
    for name, where in (("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "wandb_cache"),
                        ("WANDB_CONFIG_DIR", "wandb_config"), ("WANDB_DATA_DIR", "wandb_data"),
                        ("XDG_CACHE_HOME", "xdg_cache"), ("XDG_CONFIG_HOME", "xdg_config")):
        monkeypatch.setenv(name, str(tmp_path / where))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def records(path):
    """The records of one ``run-<id>.wandb`` file, parsed with wandb's ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zeroed rest of a block
            pos += left
            continue
        assert kind in (FULL, FIRST, MIDDLE, LAST)
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def offline_runs(root):
    """``[(directory, records)]`` of every offline wandb run under ``<root>/wandb``, oldest first.
    wandb's service process may still hold a finished run's records in its write buffer (a
    killed attempt's file was once read back holding no record yet): ``wandb.teardown()`` first, as
    at the end of a process, so that every file is complete."""
    import wandb

    wandb.teardown()
    dirs = sorted((root / "wandb").glob("offline-run-*"))
    return [(d, records(next(d.glob("run-*.wandb")))) for d in dirs]


def of_kind(recs, kind):
    return [r for r in recs if r.WhichOneof("record_type") == kind]


def history_rows(recs):
    """Each history record as ``{key: value}`` (nested keys joined with '/'), wandb's own
    ``_step``, ``_runtime``, ``_timestamp`` left out."""
    rows = []
    for r in of_kind(recs, "history"):
        row = {"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
        rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def run_record(recs):
    (run,) = of_kind(recs, "run")
    return run.run


def expected_group(run_dir, name):
    """The group from the files ``cilkit compare`` reads: results.json and config.yaml."""
    import hashlib

    from cilkit.analysis.runsets import protocol_key

    results = json.loads((run_dir / "results.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return f"{name}-{hashlib.sha256(protocol_key(results, config).encode()).hexdigest()[:8]}"


def top1_by_state(rows):
    return [(r["state/state"], r["state/top1"]) for r in rows if "state/top1" in r]


@pytest.mark.slow
def test_a_run_logs_its_config_history_accuracy_matrix_and_protocol_group(tmp_path):
    pytest.importorskip("wandb")
    cfg = tiny_config(tmp_path, "log.wandb=true", "state0_cache=null", "threads=1", "train.epochs=1")
    res = Run(cfg, tmp_path / "r", progress=False).execute()
    ((d, recs),) = offline_runs(tmp_path / "r")
    run = run_record(recs)
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["seed"] == 3 and config["method"] == "finetune" and config["log"]["wandb"] is True
    assert run.display_name == "finetune/3" and run.job_type == "finetune" and run.project == "cilkit"
    assert run.run_group == expected_group(tmp_path / "r", "tiny")
    assert (tmp_path / "r" / "wandb" / "cilkit-run-id").read_text() == run.run_id
    assert d.name.endswith(f"-{run.run_id}")
    rows = history_rows(recs)
    assert top1_by_state(rows) == [(b + 1, pytest.approx(s["top1"])) for b, s in enumerate(res["states"])]
    assert [r["state/classes_seen"] for r in rows if "state/top1" in r] == [4, 7, 10]
    assert [r["state/state"] for r in rows if "state/top1_old" in r] == [2, 3]  # state 1 has no old classes
    lines = [json.loads(x) for x in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "train/loss" in r]
    assert [r["train/epoch"] for r in epochs] == [1, 2, 3]
    assert [r["train/loss"] for r in epochs] == pytest.approx([x["loss"] for x in lines if x["kind"] == "epoch"])
    last = [r for r in rows if "state/accuracy_matrix/_type" in r][-1]
    assert last["state/accuracy_matrix/_type"] == "table-file"
    table = json.loads((d / "files" / last["state/accuracy_matrix/path"]).read_text())
    assert table["columns"] == ["after state", "state 1", "state 2", "state 3"]
    matrix = res["accuracy_matrix"]
    assert [row[0] for row in table["data"]] == [1, 2, 3]
    assert [row[1:1 + len(m)] for row, m in zip(table["data"], matrix)] == [pytest.approx(m) for m in matrix]
    assert table["data"][0][2:] == [None, None]  # states not seen yet
    assert of_kind(recs, "exit")[0].exit.exit_code == 0


def test_a_resumed_run_continues_its_one_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    cfg = tiny_config(tmp_path, "log.wandb=true", "state0_cache=null", "threads=1", "train.epochs=1")
    update, calls = Memory.update, []

    def dying(self, *args, **kwargs):  # dies in state 3, after it trained: states 1 and 2 are saved
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return update(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Memory, "update", dying)
        with pytest.raises(Killed):
            Run(cfg, tmp_path / "r", progress=False).execute()
    res = Run(cfg, tmp_path / "r", progress=False).execute(resume=True)
    (first_dir, first), (second_dir, second) = offline_runs(tmp_path / "r")
    ids = {run_record(first).run_id, run_record(second).run_id}
    assert ids == {(tmp_path / "r" / "wandb" / "cilkit-run-id").read_text()}  # one wandb run
    assert run_record(first).run_group == run_record(second).run_group == expected_group(tmp_path / "r", "tiny")
    assert of_kind(first, "exit")[0].exit.exit_code == 1 and of_kind(second, "exit")[0].exit.exit_code == 0
    both = top1_by_state(history_rows(first)) + top1_by_state(history_rows(second))
    assert both == [(b + 1, pytest.approx(s["top1"])) for b, s in enumerate(res["states"])]  # each state once
    # the killed attempt trained state 3's epoch (epoch 3); the resumed one trains it again as epoch 3
    assert [r["train/epoch"] for r in history_rows(first) if "train/loss" in r] == [1, 2, 3]
    assert [r["train/epoch"] for r in history_rows(second) if "train/loss" in r] == [3]


def test_wandb_switched_on_at_resume_holds_the_earlier_states(tmp_path):
    pytest.importorskip("wandb")
    cfg = tiny_config(tmp_path, "scenario.states=2", "state0_cache=null", "threads=1", "train.epochs=1")
    Run(cfg, tmp_path / "r", progress=False).execute(until_state=0)
    assert not (tmp_path / "r" / "wandb").exists()
    on = tiny_config(tmp_path, "scenario.states=2", "state0_cache=null", "threads=1", "train.epochs=1",
                     "log.wandb=true")
    res = Run(on, tmp_path / "r", progress=False).execute(resume=True)
    ((_, recs),) = offline_runs(tmp_path / "r")
    rows = history_rows(recs)
    assert top1_by_state(rows) == [(b + 1, pytest.approx(s["top1"])) for b, s in enumerate(res["states"])]
    assert [r["train/epoch"] for r in rows if "train/loss" in r] == [1, 2]


@pytest.mark.slow
def test_cilkit_run_logs_the_report_figures_in_the_protocol_group_and_wandb_mode_overrides(tmp_path, monkeypatch,
                                                                                           capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # overrides the config's online: nothing goes to the network
    out = tmp_path / "r"
    args = ["run", "--set", "method=finetune", "--set", "scenario.states=2", "--set", "train.epochs=1",
            "--set", "model.width=8", "--set", "threads=1", "--set", "state0_cache=null", "--set", "log.wandb=true",
            "--set", "log.wandb_mode=online", "--set", "log.wandb_project=mine", "--out", str(out)]
    assert main(args) == 0
    runs = {run_record(recs).display_name: (d, recs) for d, recs in offline_runs(out)}
    assert sorted(runs) == ["finetune/0", "report"]
    d, recs = runs["report"]
    report = run_record(recs)
    assert report.job_type == "report" and report.project == "mine"
    assert report.run_group == run_record(runs["finetune/0"][1]).run_group == expected_group(out, "quickstart")
    figures = sorted(p.stem for p in (out / "report").glob("*.png"))
    (row,) = history_rows(recs)
    assert sorted({k.split("/")[1] for k in row}) == figures and len(figures) >= 4
    assert all(row[f"report/{f}/_type"] == "image-file" and (d / "files" / row[f"report/{f}/path"]).is_file()
               for f in figures)
    assert (out / "wandb" / "cilkit-report-id").read_text() == report.run_id


def test_the_wandb_folder_is_the_runs_own_and_goes_with_an_overwrite(tmp_path):
    pytest.importorskip("wandb")
    from cilkit.runs.multirun import run_methods

    cfg = tiny_config(tmp_path, "log.wandb=true", "state0_cache=null", "threads=1", "train.epochs=1",
                      "scenario.states=2")
    run_methods(cfg, tmp_path / "r", progress=False)
    first = (tmp_path / "r" / "wandb" / "cilkit-run-id").read_text()
    run_methods(cfg, tmp_path / "r", progress=False, overwrite=True)  # no "files that are not a cilkit run"
    ((_, recs),) = offline_runs(tmp_path / "r")  # the earlier wandb run went with the earlier run
    assert run_record(recs).run_id == (tmp_path / "r" / "wandb" / "cilkit-run-id").read_text() != first


def test_runs_of_one_protocol_share_a_group_and_another_protocol_does_not(tmp_path):
    from cilkit.run.wandb_log import protocol_group

    results = {"dataset": "digits", "class_order": list(range(10)), "state_ends": [4, 7, 10]}
    base = tiny_config(tmp_path).to_dict()
    group = protocol_group(base, results)
    assert group.startswith("tiny-") and len(group) == len("tiny-") + 8
    for_method = tiny_config(tmp_path, "seed=4", "method=icarl").for_method("icarl").to_dict()  # name tiny/icarl
    assert protocol_group(for_method, results) == group
    assert protocol_group(tiny_config(tmp_path, "threads=1", "log.wandb=true").to_dict(), results) == group
    assert protocol_group(tiny_config(tmp_path, "memory.total=20").to_dict(), results) != group
    assert protocol_group(base, {**results, "state_ends": [4, 10]}) != group
    assert protocol_group({**base, "name": None}, results).startswith("digits-")


def test_wandb_asked_for_without_the_package_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    code = main(["run", "--out", str(tmp_path / "r"), "--set", "log.wandb=true", "--set", "train.epochs=1"])
    assert code == 2
    assert one_error_line(capsys) == ("error: config key 'log.wandb': needs the wandb package: "
                                      'pip install "cilkit[wandb]"')
    assert not (tmp_path / "r").exists()
