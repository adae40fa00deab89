"""Papercuts a new user hit (issue 26): what the setup line says of threads and ranks, the
"learned nothing" warning, a plugin method that raises, lock files left behind."""


import pytest
import yaml
from helpers import tiny_config, tiny_dict

from cilkit.common import distributed
from cilkit.settings import registry
from cilkit.analysis.report import provenance_line
from cilkit.cli import main
from cilkit.run import setup
from cilkit.run.health import stall_message, stalled
from cilkit.run.loop import Run


@pytest.fixture
def registries():
    """Restore the method registry after a test that imports a throwaway plugin."""
    saved = dict(registry.METHODS)
    yield
    registry.METHODS.clear()
    registry.METHODS.update(saved)


@pytest.fixture
def no_threads_record(monkeypatch):
    """No record of an earlier threads: null resolution in this process."""
    monkeypatch.delenv(setup.THREADS_FROM_NULL, raising=False)


# ----- item 5: where the thread count comes from --------------------------------------------
def test_the_setup_line_says_threads_came_from_the_config(tmp_path, no_threads_record):
    cfg = setup.with_resolved_threads(tiny_config(tmp_path, "threads=1"))
    line = Run(cfg, tmp_path / "r", progress=False).setup_line()
    assert "threads 1 (from config)" in line


def test_the_setup_line_says_threads_null_gave_the_free_cores(tmp_path, monkeypatch, no_threads_record):
    monkeypatch.setattr(setup, "free_cores", lambda: 1)  # the machine's cores, as the run found them
    cfg = setup.with_resolved_threads(tiny_config(tmp_path, "threads=null"))
    assert cfg.threads == 1
    line = Run(cfg, tmp_path / "r", progress=False).setup_line()
    assert "threads 1 (threads: null: the 1 core free at the start)" in line


def test_a_job_with_a_share_of_the_cores_says_so(tmp_path, monkeypatch, no_threads_record):
    """threads: null, then a job given 1 of the 3 free cores (--jobs 3)."""
    monkeypatch.setattr(setup, "free_cores", lambda: 3)
    setup.with_resolved_threads(tiny_config(tmp_path, "threads=null"))
    assert setup.threads_source(1) == "threads: null: a share of the 3 cores free at the start"
    setup.with_resolved_threads(tiny_config(tmp_path, "threads=1"))  # a later run that sets threads
    assert setup.threads_source(1) == "from config"


# ----- item 12: ranks and backend -----------------------------------------------------------
def test_the_report_names_the_ranks_and_backend_of_a_torchrun_run():
    prov = {"cilkit": "0.1.0", "torch": "2.3", "device_name": "cpu", "device": "cpu", "threads": 4,
            "precision": "fp32", "memory_format": "contiguous", "ranks": 2, "backend": "gloo"}
    assert "(cpu, 2 ranks (gloo), 4 threads, fp32" in provenance_line(prov)
    single = provenance_line(prov | {"ranks": 1, "backend": None})
    assert "rank" not in single and "(cpu, 4 threads, fp32" in single
    older = {k: v for k, v in prov.items() if k not in ("ranks", "backend")}  # before the record
    assert "rank" not in provenance_line(older)


def test_the_setup_line_names_the_ranks_under_torchrun(tmp_path, monkeypatch):
    run = Run(tiny_config(tmp_path, "threads=1"), tmp_path / "r", progress=False)
    assert "rank" not in run.setup_line()
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "backend", lambda: "gloo")
    assert "device cpu, 2 ranks (gloo), threads 1" in run.setup_line()


# ----- item 8: "learned nothing" compares epoch means ----------------------------------------
def test_a_fit_whose_epoch_means_fall_is_not_stalled_whatever_its_first_batch():
    # first batch 0.30 (a lucky one), epoch means 2.0 -> 0.5: it learned
    assert not stalled([2.0, 1.1, 0.5])
    assert stalled([0.69, 0.69, 0.68])  # ln 2 throughout: flat
    assert not stalled([0.69])  # one epoch: nothing to compare
    assert not stalled([])


def test_the_stall_warning_names_the_method_page():
    text = stall_message("state 1", [0.69, 0.68], "icarl")
    assert "0.680" in text and "0.690" in text and "cilkit info icarl" in text


def test_a_run_that_learns_is_not_warned_and_a_flat_one_is(tmp_path, capsys):
    """Two epochs on digits: lr 0.05 learns (no warning), lr 1e-9 cannot move (a warning per
    state, naming cilkit info finetune)."""
    res = Run(tiny_config(tmp_path, "scenario.states=2", "state0_cache=null", "threads=1"), tmp_path / "ok",
              progress=False).execute()
    assert "may have learned nothing" not in capsys.readouterr().out
    s0 = res["states"][0]
    assert s0["final_loss"] < 0.9 * s0["first_loss"]  # the two epochs' means
    Run(tiny_config(tmp_path, "scenario.states=2", "state0_cache=null", "threads=1", "train.lr=1e-9"),
        tmp_path / "flat", progress=False).execute()
    out = capsys.readouterr().out
    assert out.count("may have learned nothing") == 2 and "(see cilkit info finetune)" in out


# ----- item 11: a plugin method whose loss raises -------------------------------------------
FAILING_PLUGIN = '''
from pathlib import Path

from cilkit.methods.finetune import Finetune
from cilkit.settings.registry import register_method

FLAG = Path({flag!r})


@register_method("flaky_finetune")
class FlakyFinetune(Finetune):
    description = "fine-tuning whose loss raises in state 2 while a flag file exists (test plugin)"

    def loss(self, ctx, batch, out):
        if ctx.state.index == 1 and FLAG.exists():
            raise ValueError("flaky loss: a bug in the plugin")
        return super().loss(ctx, batch, out)
'''


@pytest.mark.slow
def test_a_plugin_loss_that_raises_goes_to_run_log_and_says_how_to_resume(tmp_path, capsys, registries):
    flag = tmp_path / "bug"
    flag.write_text("")
    plugin = tmp_path / "flaky.py"
    plugin.write_text(FAILING_PLUGIN.format(flag=str(flag)))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path) | {"threads": 1, "scenario": {
        "initial": 4, "increment": 3, "states": 2}}))
    out = tmp_path / "r"
    args = ["run", str(config), "--plugin", str(plugin), "--set", "method=flaky_finetune", "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 2  # issue 37 item 12: the plugin's error is one line, its traceback in run.log
    (console,) = capsys.readouterr().err.strip().splitlines()
    assert "ValueError: flaky loss: a bug in the plugin" in console and f"{plugin}:" in console
    assert console.endswith(f"cilkit run --resume {out}")
    log = (out / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and "ValueError: flaky loss: a bug in the plugin" in log
    assert log.rstrip().endswith(f"the finished states are saved: after the fix, continue the run with "
                                 f"cilkit run --resume {out}")
    assert log.count("Traceback") == 1
    flag.unlink()  # the fix
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out


def test_a_user_error_is_its_one_line_in_run_log(tmp_path, capsys):
    """An error the user can fix ends a run with its one line, on the console and in run.log."""
    from cilkit.common.errors import UserError

    run = Run(tiny_config(tmp_path, "threads=1", "scenario.states=2"), tmp_path / "r", progress=False)

    def refuse(b):
        raise UserError("cannot write 'x': disk full")

    run.run_state = refuse
    with pytest.raises(UserError) as caught:
        run.execute()
    assert not getattr(caught.value, "__notes__", None)
    assert (tmp_path / "r" / "run.log").read_text().splitlines()[-1] == "error: cannot write 'x': disk full"
