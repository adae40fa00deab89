"""The command line as a user meets it."""

import json
import subprocess
import sys

from cilkit.cli import main


def test_info_lists_datasets_methods_backbones_and_selection(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "fashion-mnist", "cifar100", "imagefolder", "listfile", "synthetic",
                 "finetune", "icarl", "joint", "resnet32", "resnet18", "convnet", "herding", "random"):
        assert name in out, name


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
    assert "Rebuffi" in out and "C ln 2" in out and "icarl.bce_reduction: 'sum'" in out
    assert main(["info", "no-such-thing"]) == 2
    assert "unknown name 'no-such-thing'" in capsys.readouterr().err
