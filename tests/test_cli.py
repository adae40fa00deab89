"""The command line as a user meets it."""

import json
import subprocess
import sys

import pytest

from cilkit.cli import main
from cilkit.common import omp


def test_info_lists_datasets_methods_backbones_and_selection(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "fashion-mnist", "cifar100", "imagefolder", "listfile", "synthetic",
                 "finetune", "icarl", "joint", "resnet32", "resnet18", "convnet", "herding", "random"):
        assert name in out, name


@pytest.mark.slow
def test_progress_bars_stay_quiet_off_a_terminal(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cilkit", "run", "--out", str(tmp_path / "r"), "--set", "method=finetune",
         "--set", "scenario.states=2", "--set", "train.epochs=1", "--set", "model.width=8",
         "--set", f"state0_cache={tmp_path / 'c'}"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "it/s" not in proc.stderr and "\r" not in proc.stderr + proc.stdout
    assert "state 2/2" in proc.stdout and "| finetune |" in proc.stdout
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["complete"]


def test_default_out_dir_never_overwrites_a_run(tmp_path, capsys):
    args = ["run", "--set", "method=finetune", "--set", "scenario.states=1", "--set", "train.epochs=1",
            "--set", "model.width=8"]
    assert main(args) == 0 and main(args) == 0
    assert (tmp_path / "runs" / "quickstart" / "results.json").is_file()
    assert (tmp_path / "runs" / "quickstart-2" / "results.json").is_file()


def test_resume_of_a_non_run_directory_is_a_user_error(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_info_of_a_method_prints_its_documentation_and_options(capsys):
    assert main(["info", "icarl"]) == 0
    out = capsys.readouterr().out
    assert "Rebuffi" in out and "C ln 2" in out
    assert "icarl.bce_reduction (Literal['sum', 'mean'], default 'sum'):" in out
    assert "icarl.temperature (float, default 2.0):\n      ce_kd only" in out
    assert main(["info", "no-such-thing"]) == 2
    assert "unknown name 'no-such-thing'" in capsys.readouterr().err


def test_every_method_option_has_a_type_a_default_and_a_description(capsys):
    from cilkit.settings.registry import METHODS

    for name, cls in METHODS.items():
        if not cls.__module__.startswith("cilkit."):
            continue  # methods registered by other tests
        assert main(["info", name]) == 0
        out = capsys.readouterr().out
        for key in cls.Config.model_fields:
            head = next(line for line in out.splitlines() if line.startswith(f"  {name}.{key} ("))
            assert "default" in head and head.endswith(":"), f"{name}.{key} has no description"


def test_info_lists_rectifiers_and_version_prints(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "rectifiers (cilkit calibrate --with):" in out and "scaling" in out
    from cilkit.cil.rectify import RECTIFIERS

    listed = out.split("rectifiers (cilkit calibrate --with):")[1].splitlines()
    for name in RECTIFIERS:  # each with its line of description
        line = next(x for x in listed if x.split() and x.split()[0] == name)
        assert len(line.split()) > 2, f"rectifier {name} has no description"
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("cilkit 0.")


def test_the_first_line_of_a_run_states_its_setup(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(omp, "CHOSEN", omp.WaitPolicy("PASSIVE", "set in the environment", chosen=False))
    args = ["run", "--set", "method=finetune", "--set", "scenario.states=2", "--set", "train.epochs=1",
            "--set", "model.width=8", "--set", "threads=1", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("[finetune] digits: 10 classes, images 1x8x8; 2 states of 2 + 1 x 2 classes; memory 200 "
                     "exemplars (herding); device cpu, threads 1 (from config), idle threads sleep "
                     "(OMP_WAIT_POLICY=PASSIVE: set in the environment), fp32; seed 0")
