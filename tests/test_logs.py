"""A run's training record: history.jsonl, run.log, TensorBoard events (log.tensorboard)."""

import json
import sys

import pytest
from helpers import tiny_config

from cilkit.cli import main
from cilkit.cil.memory import Memory
from cilkit.run.loop import Run
from cilkit.runs.multirun import run_methods

TIMINGS = {"seconds", "images_per_second"}


class Killed(Exception):
    """Stands for a run killed in the middle of a state."""


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def without_timings(lines):
    return [{k: v for k, v in line.items() if k not in TIMINGS} for line in lines]


def kill_in_state(monkeypatch, b):
    """Make the run die in state ``b`` (0-based) after it trained, before its checkpoint."""
    update = Memory.update  # called once per state, right after the state trained
    calls = []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == b + 1:
            raise Killed
        return update(self, *args, **kwargs)

    monkeypatch.setattr(Memory, "update", dying)


@pytest.mark.slow
def test_history_records_every_epoch_of_every_stage_and_every_state(tmp_path, capsys):
    # LUCIR's class-balanced finetuning is a second stage; milestone 1: the lr drops after epoch 1
    cfg = tiny_config(tmp_path, "method=lucir", "lucir.cbf=true", "lucir.cbf_epochs=2", "lucir.cbf_milestones=[1]",
                      "train.schedule.milestones=[1]", "state0_cache=null")
    res = Run(cfg, tmp_path / "r", progress=False).execute()
    lines = history(tmp_path / "r")
    epochs = [line for line in lines if line["kind"] == "epoch"]
    assert [(e["state"], e["round"], e["stage"], e["epoch"]) for e in epochs] == [
        (1, 1, "train", 1), (1, 1, "train", 2),
        (2, 1, "train", 1), (2, 1, "train", 2), (2, 1, "balanced finetuning", 1), (2, 1, "balanced finetuning", 2),
        (3, 1, "train", 1), (3, 1, "train", 2), (3, 1, "balanced finetuning", 1), (3, 1, "balanced finetuning", 2),
    ]
    # the lr each epoch trained with: the scheduler steps after the epoch
    assert [e["lr"] for e in epochs[:6]] == pytest.approx([0.05, 0.005, 0.05, 0.005, 0.01, 0.001])
    for b, s in enumerate(res["states"]):
        last_train = [e for e in epochs if e["state"] == b + 1 and e["stage"] == "train"][-1]
        assert last_train["loss"] == pytest.approx(s["final_loss"])
        assert all(e["seconds"] > 0 and e["images_per_second"] > 0 for e in epochs if e["state"] == b + 1)
    states = [line for line in lines if line["kind"] == "state"]
    assert [line["state"] for line in states] == [1, 2, 3]
    for line, s in zip(states, res["states"]):
        for key in ("classes_seen", "top1", "top1_old", "top1_new", "balanced_top1"):
            assert line[key] == s[key]
        assert line["seconds"] == s["time_s"]
    # each state line comes after its state's epochs
    assert [line["kind"] for line in lines].index("state") == 2
    # run.log holds exactly the lines the run printed
    printed = capsys.readouterr().out.splitlines()
    assert (tmp_path / "r" / "run.log").read_text().splitlines() == printed
    assert any("state 3: top-1" in p for p in printed)


@pytest.mark.slow
def test_a_resumed_run_has_the_history_of_an_uninterrupted_one(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "state0_cache=null")
    Run(cfg, tmp_path / "full", progress=False).execute()
    with monkeypatch.context() as m:
        kill_in_state(m, 1)
        with pytest.raises(Killed):
            Run(cfg, tmp_path / "cut", progress=False).execute()
    cut = history(tmp_path / "cut")
    assert any(line["state"] == 2 for line in cut)  # the killed state had logged its epochs
    log_before = (tmp_path / "cut" / "run.log").read_text()
    assert "state 2/3" in log_before  # what the killed attempt printed was kept
    assert main(["run", "--resume", str(tmp_path / "cut")]) == 0
    assert without_timings(history(tmp_path / "cut")) == without_timings(history(tmp_path / "full"))
    log_after = (tmp_path / "cut" / "run.log").read_text()
    assert log_after.startswith(log_before) and "resuming" in log_after[len(log_before):]


def test_a_cached_state0_has_a_state_line_and_no_epoch_lines(tmp_path):
    cfg = tiny_config(tmp_path, "scenario.states=2")
    Run(cfg, tmp_path / "cold", progress=False).execute()
    Run(cfg, tmp_path / "warm", progress=False).execute()
    cold, warm = history(tmp_path / "cold"), history(tmp_path / "warm")
    assert [(x["kind"], x["state"]) for x in warm] == [("state", 1), ("epoch", 2), ("epoch", 2), ("state", 2)]
    assert without_timings(warm) == without_timings(cold[2:])  # all but state 1's two epochs


def test_a_comparison_logs_every_method_in_its_parent_directory(tmp_path):
    cfg = tiny_config(tmp_path, "method=[finetune,joint]", "scenario.states=2", "train.epochs=1")
    run_methods(cfg, tmp_path / "cmp", progress=False)
    parent = (tmp_path / "cmp" / "run.log").read_text().splitlines()
    for m in ("finetune", "joint"):
        own = (tmp_path / "cmp" / m / "run.log").read_text().splitlines()
        assert own and all(line.startswith(f"[{m}]") for line in own)
        assert [line for line in parent if line.startswith(f"[{m}]")] == own  # each line once


def _events(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_tensorboard_events_per_epoch_and_per_state_survive_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, "log.tensorboard=true", "state0_cache=null")  # 3 states of 2 epochs
    with monkeypatch.context() as m:
        kill_in_state(m, 2)
        with pytest.raises(Killed):
            Run(cfg, tmp_path / "r", progress=False).execute()
    Run(cfg, tmp_path / "r", progress=False).execute(resume=True)
    acc = _events(tmp_path / "r" / "tb")
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/lr", "train/term/ce", "state/top1", "state/top1_old",
                                    "state/top1_new", "state/balanced_top1"}  # fine-tuning's one loss term, ce
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]  # 2 epochs x 3 states, once each
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in acc.Scalars("train/term/ce")] == pytest.approx([e.value for e in acc.Scalars("train/loss")])
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [e.step for e in acc.Scalars("state/top1")] == [4, 7, 10]  # against the classes seen
    assert [e.value for e in acc.Scalars("state/top1")] == pytest.approx([s["top1"] for s in results["states"]])
    assert [e.step for e in acc.Scalars("state/top1_old")] == [7, 10]  # state 1 has no old classes
    losses = [line["loss"] for line in history(tmp_path / "r") if line["kind"] == "epoch"]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses)
    images = acc.Images("state/accuracy_matrix")
    assert [i.step for i in images] == [4, 7, 10] and images[-1].encoded_image_string.startswith(b"\x89PNG")


def test_tensorboard_asked_for_without_the_package_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code = main(["run", "--out", str(tmp_path / "r"), "--set", "log.tensorboard=true", "--set", "train.epochs=1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: config key 'log.tensorboard': needs the tensorboard package: "
                   'pip install "cilkit[tensorboard]"')
    assert not (tmp_path / "r").exists()


def test_an_unknown_log_key_is_named(tmp_path):
    from cilkit.common.errors import UserError

    with pytest.raises(UserError, match="unknown key 'log.tensorbord'"):
        tiny_config(tmp_path, "log.tensorbord=true")


def test_tensorboard_switched_on_at_resume_holds_the_earlier_states(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, "scenario.states=2", "state0_cache=null")
    Run(cfg, tmp_path / "r", progress=False).execute(until_state=0)
    assert not (tmp_path / "r" / "tb").exists()
    on = tiny_config(tmp_path, "scenario.states=2", "state0_cache=null", "log.tensorboard=true")
    Run(on, tmp_path / "r", progress=False).execute(resume=True)
    acc = _events(tmp_path / "r" / "tb")
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("state/top1")] == [4, 7]


@pytest.mark.slow
def test_cilkit_run_puts_the_report_figures_into_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from cilkit.cli import main

    args = ["run", "--set", "method=finetune", "--set", "scenario.states=2", "--set", "train.epochs=1",
            "--set", "model.width=8", "--set", "threads=1", "--set", "log.tensorboard=true", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    acc = _events(tmp_path / "r" / "tb" / "report")
    figures = sorted(p.stem for p in (tmp_path / "r" / "report").glob("*.png"))
    assert sorted(acc.Tags()["images"]) == [f"report/{name}" for name in figures] and len(figures) >= 4
    assert _events(tmp_path / "r" / "tb").Tags()["scalars"]  # the run's own events are still there


def test_a_damaged_history_does_not_stop_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, "log.tensorboard=true", "state0_cache=null", "keep_checkpoints=all")
    Run(cfg, tmp_path / "r", progress=False).execute(until_state=1)
    good = without_timings(history(tmp_path / "r"))
    with open(tmp_path / "r" / "history.jsonl", "ab") as f:  # a crash and a disk error left these
        f.write(b'{"state": 1}\n{"state": 1, "kind": "epoch"}\n\xff\xfe\n{"kind": "state", "sta')
    res = Run(cfg, tmp_path / "r", progress=False).execute(resume=True)
    assert res["complete"]
    assert without_timings(history(tmp_path / "r"))[: len(good)] == good  # the damaged lines are gone


@pytest.mark.slow
def test_a_run_log_that_cannot_be_written_is_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["run", "--set", "method=finetune", "--set", "scenario.states=2", "--set", "train.epochs=1",
            "--set", "model.width=8", "--set", "threads=1", "--set", "keep_checkpoints=all", "--out", str(out)]
    assert main(args) == 0
    (out / "checkpoints" / "state_01.pt").unlink()
    (out / "run.log").unlink()
    (out / "run.log").symlink_to("/dev/full")  # every write: no space left on device
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write '{(out / 'run.log').resolve()}': No space left on device"]


def test_a_broken_tensorboard_install_is_one_line(tmp_path, monkeypatch, capsys):
    class Broken:
        def __getattr__(self, name):
            raise TypeError("Descriptors cannot be created directly.")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", Broken())
    code = main(["run", "--out", str(tmp_path / "r"), "--set", "log.tensorboard=true", "--set", "train.epochs=1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the tensorboard package cannot be imported (TypeError: Descriptors" in err[0]
    assert not (tmp_path / "r").exists()


def _job(run_dir, label="finetune/run_1", seed=4):
    from cilkit.runs.jobs import RunJob

    return RunJob(label, run_dir, {"method": "finetune", "seed": seed})


def test_a_jobs_warnings_are_forwarded_once_with_its_label_and_seed_to_the_parent_log(tmp_path, capsys):
    # issue 40 item 2: the warnings of a job in another process (--jobs, SLURM) reach the console and the
    # parent's run.log, read off the job's own run.log as it writes it, each once
    from cilkit.common import runlog
    from cilkit.runs.status import WarningRelay

    job_dir, parent = tmp_path / "p" / "finetune" / "run_1", tmp_path / "p"
    job_dir.mkdir(parents=True)
    child = job_dir / "run.log"
    child.write_text("[finetune] warning: from an earlier attempt\n")

    def write(text):
        with open(child, "a") as f:
            f.write(text)

    relay = WarningRelay()
    job = _job(job_dir)
    with runlog.tee(parent / "run.log"):
        relay.watch(job)  # before the job starts: what run.log holds already is not its news
        write("[finetune] state 1/2: classes 0..3 new, 4 seen\n[finetune] warning: state 1: stalled\n"
              "warning: the state-0 cache was not written (full); the run goes on\n"
              "[finetune with memory 60] warning: tagged otherwise\n[finetune] warning: half a li")
        relay.forward(job)
        relay.forward(job)  # nothing new: nothing twice
        write("ne\n[finetune] warning: the last, cut off by the end")
        relay.forward(job)
        relay.forward(job, final=True)  # the job ended: its last line, newline or not
        relay.forward(job, final=True)
    forwarded = ["[finetune/run_1, seed 4] warning: state 1: stalled",
                 "[finetune/run_1, seed 4] warning: the state-0 cache was not written (full); the run goes on",
                 "[finetune/run_1, seed 4] [finetune with memory 60] warning: tagged otherwise",
                 "[finetune/run_1, seed 4] warning: half a line",
                 "[finetune/run_1, seed 4] warning: the last, cut off by the end"]
    assert capsys.readouterr().out.splitlines() == forwarded
    assert (parent / "run.log").read_text().splitlines() == forwarded
    assert "seed 4" not in child.read_text()  # the job's own run.log holds its lines once, as it wrote them


def test_a_single_jobs_warnings_are_not_written_twice_into_its_run_log(tmp_path, capsys):
    # one method, one seed under --jobs: the job's run directory is the parent's, one run.log for both
    from cilkit.common import runlog
    from cilkit.runs.status import WarningRelay

    relay, job = WarningRelay(), _job(tmp_path, label="finetune", seed=3)
    with runlog.tee(tmp_path / "run.log"):
        relay.watch(job)
        with open(tmp_path / "run.log", "a") as f:  # the job's process, appending to the same file
            f.write("[finetune] warning: state 2: stalled\n")
        relay.forward(job, final=True)
    assert capsys.readouterr().out == "[finetune, seed 3] warning: state 2: stalled\n"
    assert (tmp_path / "run.log").read_text() == "[finetune] warning: state 2: stalled\n"
