"""Config validation: every user mistake is one line naming the key, exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from cilkit.cli import main
from cilkit.settings.config import apply_overrides, load_config, validate
from cilkit.common.errors import UserError
from helpers import one_error_line


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_quickstart_is_valid_and_compares_finetune_and_icarl():
    cfg = load_config(None)
    assert cfg.method_names == ["finetune", "icarl"]
    assert cfg.data.name == "digits"
    assert (cfg.scenario.initial, cfg.scenario.increment) == (2, 2)


def test_overrides_reach_nested_keys_and_parse_yaml_values():
    cfg = load_config(None, ["method=icarl", "memory.total=500", "train.schedule.milestones=[3, 6]", "icarl.loss=ce_kd"])
    assert cfg.method == "icarl"
    assert cfg.memory.total == 500
    assert cfg.train.schedule.milestones == [3, 6]
    assert cfg.method_options("icarl")["loss"] == "ce_kd"


def test_override_does_not_mutate_input():
    data = {"memory": {"total": 1}}
    apply_overrides(data, ["memory.total=2"])
    assert data["memory"]["total"] == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("memroy: {total: 10}\n", "unknown key 'memroy'"),
        ("memory: {totl: 10}\n", "unknown key 'memory.totl'"),
        ("memory: {total: -5}\n", "config key 'memory.total'"),
        ("train: {epochs: many}\n", "config key 'train.epochs'"),
        ("method: nosuch\n", "unknown method 'nosuch'"),
        ("data: {name: nosuch}\n", "unknown dataset 'nosuch'"),
        ("memory: {total: 10, per_class: 2}\n", "not both"),
        ("icarl: {loss: hinge}\n", "icarl.loss"),
        ("device: tpu\n", "config key 'device'"),
    ],
)
def test_bad_config_values_name_the_key(tmp_path, text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, text))


def test_bad_yaml_names_the_line(tmp_path):
    with pytest.raises(UserError, match="line 2"):
        load_config(write(tmp_path, "seed: 1\nmemory: total: 5\n"))


def test_missing_file():
    with pytest.raises(UserError, match="not found"):
        load_config("/nonexistent/run.yaml")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "memory.total=-1"], "memory.total"),
        (["--set", "scenario.initial=8", "--set", "scenario.states=3"], "scenario"),
        (["--set", "method=nosuch"], "unknown method"),
        (["--set", "nokey"], "expected key=value"),
    ],
)
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    code = main(["run", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r" / "results.json").exists()


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cilkit", "run", "--set", "memory.total=-3", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "memory.total" in proc.stderr


def test_validate_names_the_source():
    with pytest.raises(UserError, match="^my.yaml: "):
        validate({"seed": "x"}, source="my.yaml")


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
KNOWN_CLASSES = {"cifar100": 100, "fashion-mnist": 10, "digits": 10}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_is_valid_and_fits_its_dataset(path):
    cfg = load_config(path)  # raises UserError on any invalid key or method option
    n = KNOWN_CLASSES.get(cfg.data.name)
    if n is not None and cfg.scenario.states is not None:
        assert cfg.scenario.initial + cfg.scenario.increment * (cfg.scenario.states - 1) <= n
    if n is not None:
        assert cfg.scenario.initial < n and (n - cfg.scenario.initial) % cfg.scenario.increment == 0


def test_per_class_over_a_config_with_a_total_says_how_to_clear_it(tmp_path, capsys):
    """A config with memory.total and --set memory.per_class=5: one line that names the fix."""
    from cilkit.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: finetune\ndata: {name: digits}\nmemory: {total: 60}\n")
    assert main(["run", str(cfg), "--set", "memory.per_class=5", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not both" in err[0] and "--set memory.total=null" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_milestone_past_the_last_epoch_is_a_warning_naming_the_key(tmp_path):
    from helpers import tiny_config

    from cilkit.run.setup import build_scenario, idle_milestones

    from cilkit.data import load_dataset

    def warning(*overrides: str) -> str | None:
        cfg = tiny_config(tmp_path, "train.schedule.type=multistep", *overrides)
        return idle_milestones(cfg, build_scenario(cfg, load_dataset(cfg.data)))

    text = warning("train.epochs=2", "train.schedule.milestones=[4]")
    assert text is not None and "train.schedule.milestones" in text and "[4]" in text and "every state" in text
    assert warning("train.epochs=5", "train.schedule.milestones=[4]") is None
    first_only = warning("train.epochs=5", "train.epochs_first=3", "train.schedule.milestones=[4]")
    assert first_only is not None and "state(s) 1" in first_only
    assert warning("train.epochs=2", "train.schedule.type=constant", "train.schedule.milestones=[4]") is None


def test_a_run_with_an_idle_milestone_says_so(tmp_path, capsys):
    from helpers import tiny_config

    from cilkit.run.loop import Run

    cfg = tiny_config(tmp_path, "train.epochs=1", "scenario.states=2", "train.schedule.milestones=[4]", "threads=1",
                      "state0_cache=null")
    Run(cfg, tmp_path / "r", progress=False).execute()
    assert "warning: config key 'train.schedule.milestones': [4] at or past the last epoch" in capsys.readouterr().out


NEEDS_ROOT = [p for p in SHIPPED if load_config(p).data.root is None and load_config(p).data.name in ("cifar100", "imagefolder")]


def test_no_shipped_config_points_at_a_made_up_folder():
    """The paper configs leave data.root unset (the user's folder), never a fake path."""
    assert len(NEEDS_ROOT) >= 15
    assert not [p.name for p in SHIPPED if "/path/to" in p.read_text()]


@pytest.mark.parametrize("path", NEEDS_ROOT, ids=[p.name for p in NEEDS_ROOT])
def test_a_paper_config_without_its_data_root_says_how_to_set_it(path, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    name = load_config(path).data.name
    assert line.startswith(f"error: data.root is required for {name}: pass --set data.root=DIR")
    assert ("cifar-100-python/" if name == "cifar100" else "train/<class>/") in line
    assert not out.exists()  # nothing written before the data was found
