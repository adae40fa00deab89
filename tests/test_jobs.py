"""``--jobs N``: runs in processes of their own give the serial run's numbers, overlap in time,
share the state-0 cache safely, report a failed job in one line and resume only the unfinished
ones (cilkit.runs.jobs, cilkit.runs.execution)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cilkit.cli import main
from cilkit.settings.config import validate
from cilkit.common.errors import UserError
from cilkit.runs.execution import Execution
from cilkit.runs.jobs import cpu_threads_per_job, gpus_for_jobs, plan
from cilkit.runs.status import JobProgress, read_progress, status_line
from cilkit.runs.multirun import run_methods
from helpers import strip_timings, tiny_config, tiny_dict

def _results(root: Path) -> dict[str, object]:
    return {str(p.relative_to(root)): strip_timings(json.loads(p.read_text())) for p in sorted(root.rglob("results.json"))}


@pytest.mark.slow
def test_jobs_equal_the_serial_run_and_overlap_in_time(tmp_path):
    overrides = ("method=[finetune,icarl]", "runs=2", "threads=1", "train.epochs=4", "scenario.states=2")
    serial = tmp_path / "serial"
    run_methods(tiny_config(tmp_path, *overrides, state0_cache=None), serial, progress=False)
    par = tmp_path / "par"
    run_methods(tiny_config(tmp_path, *overrides, state0_cache=None), par, progress=False, execution=Execution(jobs=2))
    assert len(_results(serial)) == 4
    assert _results(par) == _results(serial)
    assert json.loads((par / "summary.json").read_text()) == json.loads((serial / "summary.json").read_text())
    # the first two jobs ran at once: the second started before the first ended (the parent's log)
    lines = (par / "run.log").read_text().splitlines()
    assert lines.index(next(x for x in lines if x.startswith("[jobs] finetune/run_1: started"))) < lines.index(
        next(x for x in lines if x.startswith("[jobs] finetune/run_0: done")))


KILLER = '''
import os, signal
from pathlib import Path
from cilkit.methods.finetune import Finetune
from cilkit.settings.registry import register_method

@register_method("killable")
class Killable(Finetune):
    """Fine-tuning whose process is killed after state 1 while the flag file exists."""
    def after_state(self, ctx):
        super().after_state(ctx)
        flag = Path(os.environ["KILL_FLAG"])
        if ctx.state.index == 0 and flag.exists():
            flag.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.slow
def test_a_killed_job_is_one_line_the_others_finish_and_resume_runs_it_alone(tmp_path, monkeypatch, capsys):
    plugin = tmp_path / "killer.py"
    plugin.write_text(KILLER)
    flag = tmp_path / "kill-now"
    monkeypatch.setenv("KILL_FLAG", str(flag))
    cfg = tiny_dict(tmp_path) | {"threads": 1, "state0_cache": None, "plugins": [str(plugin)]}
    cfg["scenario"] = {**cfg["scenario"], "states": 2}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    flag.write_text("")
    par = tmp_path / "par"
    code = main(["run", str(path), "--methods", "finetune,killable", "--jobs", "2", "--out", str(par)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{par / 'killable'}: the job's process was killed (signal 9)" in err
    assert f"cilkit run --resume {par}" in err
    assert json.loads((par / "finetune" / "results.json").read_text())["complete"]  # the other job finished
    finished_before = (par / "finetune" / "results.json").read_bytes()
    assert main(["run", "--resume", str(par), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 runs finished already; running the other 1" in out
    assert (par / "finetune" / "results.json").read_bytes() == finished_before  # not run again
    serial = tmp_path / "serial"
    assert main(["run", str(path), "--methods", "finetune,killable", "--out", str(serial)]) == 0
    assert _results(par) == _results(serial)  # the resumed job ends as an uninterrupted one


@pytest.mark.slow
def test_every_warning_of_every_job_reaches_the_console_and_the_parent_log_once(tmp_path, capsys):
    # issue 40 item 2: an lr of 1e-9 stalls every fit (a warning per state); milestones past the last epoch
    # are a warning at the start
    cfg = tiny_dict(tmp_path) | {"threads": 1, "state0_cache": None, "runs": 2}
    cfg["scenario"] = {**cfg["scenario"], "states": 2}
    cfg["train"] = {**cfg["train"], "lr": 1e-9, "schedule": {"type": "multistep", "milestones": [50]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    par = tmp_path / "par"
    assert main(["run", str(path), "--jobs", "2", "--out", str(par)]) == 0
    printed = capsys.readouterr().out.splitlines()
    parent = (par / "run.log").read_text().splitlines()
    for k, seed in ((0, 3), (1, 4)):
        own = [line for line in (par / f"run_{k}" / "run.log").read_text().splitlines() if "warning:" in line]
        assert len(own) == 3 and all(line.startswith("[finetune] warning: ") for line in own)  # each once, as written
        forwarded = [line.replace("[finetune]", f"[finetune/run_{k}, seed {seed}]", 1) for line in own]
        assert [line for line in printed if line.startswith(f"[finetune/run_{k}, ")] == forwarded
        assert [line for line in parent if line.startswith(f"[finetune/run_{k}, ")] == forwarded


@pytest.mark.slow
def test_jobs_needing_one_state0_model_train_it_once(tmp_path):
    # SS-IL trains state 0 as fine-tuning: both jobs want the same cache entry
    cfg = tiny_config(tmp_path, "method=[finetune,ssil]", "threads=1", "scenario.states=2", "train.epochs=3")
    par = tmp_path / "par"
    run_methods(cfg, par, progress=False, execution=Execution(jobs=2))
    cached = sorted(json.loads((par / m / "results.json").read_text())["states"][0]["state0_cached"]
                    for m in ("finetune", "ssil"))
    assert cached == [False, True]  # one trained it, the other waited and loaded it
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    serial = tmp_path / "serial"
    run_methods(tiny_config(tmp_path, "method=[finetune,ssil]", "threads=1", "scenario.states=2", "train.epochs=3",
                            state0_cache=None), serial, progress=False)
    assert _results(par) == _results(serial)


def test_plan_lists_every_method_and_seed_with_its_directory(tmp_path):
    cfg = tiny_config(tmp_path, "method=[finetune,icarl]", "runs=2", "seed=5")
    jobs = plan(cfg, tmp_path / "out")
    assert [(j.label, j.run_dir.relative_to(tmp_path / "out").as_posix(), j.config["seed"], j.config["method"])
            for j in jobs] == [("finetune/run_0", "finetune/run_0", 5, "finetune"),
                               ("finetune/run_1", "finetune/run_1", 6, "finetune"),
                               ("icarl/run_0", "icarl/run_0", 5, "icarl"), ("icarl/run_1", "icarl/run_1", 6, "icarl")]
    assert all(validate(j.config).runs == 1 for j in jobs)
    one = plan(tiny_config(tmp_path), tmp_path / "one")
    assert [(j.label, j.run_dir) for j in one] == [("finetune", tmp_path / "one")]


def test_each_job_gets_its_share_of_the_cores(tmp_path):
    unset = tiny_config(tmp_path, "threads=null")
    assert cpu_threads_per_job(unset, 2, 2) == (1, None)
    assert cpu_threads_per_job(unset, 3, 16) == (5, None)
    assert cpu_threads_per_job(unset, 4, 2) == (1, None)
    threads, warning = cpu_threads_per_job(tiny_config(tmp_path, "threads=2"), 2, 2)
    assert threads == 2 and warning is not None and "exceed the 2 free cores" in warning
    assert Execution(jobs=2).resolve_threads(unset).threads >= 1


def test_one_gpu_per_job():
    assert gpus_for_jobs("cpu", 2, 4) is None
    assert gpus_for_jobs("auto", 2, 0) is None
    assert gpus_for_jobs("auto", 2, 4) == [0, 1, 2, 3]
    assert gpus_for_jobs("cuda", 2, 2) == [0, 1]
    with pytest.raises(UserError, match="has 2 GPU"):
        gpus_for_jobs("cuda", 3, 2)
    with pytest.raises(UserError, match="names one GPU"):
        gpus_for_jobs("cuda:1", 2, 2)
    with pytest.raises(UserError, match="no CUDA device"):
        gpus_for_jobs("cuda", 2, 0)


def test_status_line_reads_the_jobs_history(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    lines = [{"kind": "epoch", "state": 1, "round": 1, "stage": "train", "epoch": e, "loss": 1.0, "lr": 0.1}
             for e in (1, 2, 3, 4)]
    lines += [{"kind": "state", "state": 1, "classes_seen": 4, "top1": 90.0, "top1_old": None, "top1_new": 90.0,
               "balanced_top1": 90.0},
              {"kind": "epoch", "state": 2, "round": 1, "stage": "train", "epoch": 1, "loss": 1.0, "lr": 0.1}]
    (run / "history.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"kind\": \"ep")  # a line being written
    p = read_progress(run, [4, 2, 2])
    assert (p.states_done, p.state, p.epoch, p.epochs) == (1, 2, 1, 2)
    # done: 1 state + half of the second of 3 -> 1.5/3; 30 s so far -> 30 s to go
    assert status_line("icarl/run_0", p, 3, 30.0) == "[jobs] icarl/run_0: state 2/3, epoch 1/2, ETA 30s"
    assert status_line("x", JobProgress(), 3, 5.0) == "[jobs] x: state 1/3"


def test_bad_jobs_and_executor_are_one_line(tmp_path, capsys):
    assert main(["run", "--jobs", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--jobs 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--executor", "pbs"])
