"""A method's own protocol keys in a comparison (``--set lwf:memory.total=0``, ``methods:``) and
the memory a method is defined with (``needs_memory``: LwF refuses one unless ``allow_memory``,
then it is labelled ``lwf (with memory N)``): issue 40, item 1."""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from cilkit.analysis.runsets import _method_options
from cilkit.cli import main
from cilkit.common.errors import UserError
from cilkit.methods.finetune import Finetune
from cilkit.run.loop import Run
from cilkit.runs.jobs import plan
from cilkit.runs.multirun import claimed_runs
from cilkit.settings.config import load_config, read_yaml, validate
from cilkit.settings.overrides import method_label, parse_override
from cilkit.settings.registry import METHODS
from helpers import one_error_line, strip_timings, tiny_config, tiny_dict

TINY = ("threads=1", "scenario.states=2", "train.epochs=1")


# ----- refusal and permission ------------------------------------------------------------------
def test_lwf_with_a_memory_is_refused_in_one_line_saying_how_to_run_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--set", "method=lwf", "--set", "memory.total=200"]) == 2
    line = one_error_line(capsys)
    assert "method 'lwf' keeps no memory but memory.total is 200" in line
    assert "--set memory.total=0" in line and "two protocols" in line and "lwf.allow_memory=true" in line
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_in_a_comparison_the_refusal_names_the_per_method_override(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--methods", "finetune,lwf"]) == 2  # the quickstart's memory of 200
    line = one_error_line(capsys)
    assert "--set lwf:memory.total=0" in line and "two protocols" in line


def test_a_per_class_memory_is_refused_too():
    with pytest.raises(UserError, match=r"memory.per_class is 20: run it with --set memory.per_class=0"):
        load_config(None, ["method=lwf", "memory.total=null", "memory.per_class=20"])


def test_allow_memory_lets_lwf_train_on_a_memory():
    cfg = load_config(None, ["method=lwf", "lwf.allow_memory=true"])
    assert cfg.memory.total == 200 and cfg.method_options("lwf")["allow_memory"] is True
    assert load_config(None, ["method=lwf", "memory.total=0"]).memory.total == 0  # as its configs run it


class _NeedsMemory(Finetune):
    needs_memory: ClassVar[bool | None] = True


@pytest.fixture
def needs_memory_method():
    METHODS["needs_memory_test"] = _NeedsMemory
    yield "needs_memory_test"
    del METHODS["needs_memory_test"]


def test_a_method_that_needs_a_memory_refuses_to_run_without_one(needs_memory_method):
    with pytest.raises(UserError, match="method 'needs_memory_test' needs a memory"):
        load_config(None, [f"method={needs_memory_method}", "memory.total=0"])
    assert load_config(None, [f"method={needs_memory_method}"]).memory.total == 200


# ----- the override ------------------------------------------------------------------------------
def test_set_with_a_method_prefix_is_that_methods_key():
    assert parse_override("lwf:memory.total=0") == (["methods", "lwf", "memory", "total"], 0)
    assert parse_override("memory.total=0") == (["memory", "total"], 0)
    with pytest.raises(UserError, match="empty key"):
        parse_override(":memory.total=0")


def test_the_override_reaches_that_methods_runs_alone(tmp_path):
    cfg = tiny_config(tmp_path, "method=[finetune,lwf]", "runs=2", "lwf:memory.total=0", "lwf:model.width=16")
    jobs = {j.label: j for j in plan(cfg, tmp_path / "out")}
    assert [(label, j.config["memory"]["total"], j.config["model"]["width"]) for label, j in jobs.items()] == [
        ("finetune/run_0", 60, 8), ("finetune/run_1", 60, 8), ("lwf/run_0", 0, 16), ("lwf/run_1", 0, 16)]
    assert not any("methods" in j.config for j in jobs.values())  # each run's config is resolved
    # the other method's runs are exactly those of a comparison without the override
    plain = {j.label: j for j in plan(tiny_config(tmp_path, "method=[finetune,icarl]", "runs=2"), tmp_path / "out")}
    assert jobs["finetune/run_1"] == plain["finetune/run_1"]
    # what --jobs N and --executor slurm send to a job: the pickled job, overrides applied
    assert pickle.loads(pickle.dumps(jobs["lwf/run_0"])).config["memory"]["total"] == 0


def test_a_methods_mapping_in_the_config_equals_the_set_form(tmp_path):
    base = {**tiny_dict(tmp_path), "method": ["finetune", "lwf"]}
    dotted = validate({**base, "methods": {"lwf": {"memory.total": 0}}})
    nested = validate({**base, "methods": {"lwf": {"memory": {"total": 0}}}})
    by_set = tiny_config(tmp_path, "method=[finetune,lwf]", "lwf:memory.total=0")
    assert dotted.methods == nested.methods == by_set.methods == {"lwf": {"memory": {"total": 0}}}
    assert dotted.for_method("lwf").memory.total == 0 and dotted.for_method("finetune").memory.total == 60
    assert validate(dotted.to_dict()).to_dict() == dotted.to_dict()  # config.yaml reads back the same
    assert "methods" not in tiny_config(tmp_path).to_dict()  # a config without overrides records none


@pytest.mark.parametrize("item, message", [
    ("lwf:seed=1", "config key 'methods.lwf.seed': only protocol keys"),
    ("lwf:threads=1", "'threads' is not one"),
    ("lwf:lwf.loss=ce_kd", "'lwf.loss' is a method's option, that method's alone already"),
    ("lfw:memory.total=0", "config key 'methods.lfw': unknown method 'lfw': did you mean 'lwf'?"),
    ("lwf:memory.totl=0", "unknown key 'methods.lwf.memory.totl': did you mean 'methods.lwf.memory.total'"),
    # ^ then "or 'methods.lwf.memory.budget_bytes'?" (issue 39 item 6: a protocol key close to it by difflib)
    ("lwf:memory.total=-1", "config key 'methods.lwf.memory.total': Input should be greater than or equal to 0"),
])
def test_a_bad_override_is_one_line_naming_it(tmp_path, capsys, monkeypatch, item, message):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--methods", "finetune,lwf", "--set", "memory.total=0", "--set", item]) == 2
    assert message in one_error_line(capsys)


def test_a_resumed_parent_plans_its_runs_with_the_overrides(tmp_path):
    cfg = tiny_config(tmp_path, "method=[finetune,lwf]", "lwf:memory.total=0")
    out = tmp_path / "out"
    with claimed_runs(cfg, out) as claim:
        first = claim.jobs
    recorded = read_yaml(out / "config.yaml")
    assert recorded["methods"] == {"lwf": {"memory": {"total": 0}}}
    again = plan(validate(recorded), out, resume=True)  # what cilkit run --resume OUT plans
    assert [(j.label, j.config) for j in again] == [(j.label, j.config) for j in first]


def test_the_state0_cache_keys_a_methods_run_on_its_resolved_config(tmp_path):
    cfg = tiny_config(tmp_path, *TINY, "method=[finetune,lwf]", "lwf:memory.total=0", "lwf:model.width=16")
    alone = tiny_config(tmp_path, *TINY, "method=lwf", "memory.total=0", "model.width=16")
    narrow = tiny_config(tmp_path, *TINY, "method=lwf", "memory.total=0")
    entry = Run(cfg.for_method("lwf"), tmp_path / "a", progress=False).state0_entry()
    assert entry == Run(alone, tmp_path / "b", progress=False).state0_entry()
    assert entry != Run(narrow, tmp_path / "c", progress=False).state0_entry()


def test_a_run_refuses_a_config_with_unresolved_overrides(tmp_path):
    cfg = tiny_config(tmp_path, "method=lwf", "lwf:memory.total=0")
    with pytest.raises(ValueError, match="for_method"):
        Run(cfg, tmp_path / "r", progress=False)


# ----- labels and groups ---------------------------------------------------------------------------
def test_a_memory_free_method_with_a_memory_is_labelled_with_it():
    assert method_label("lwf", {"memory": {"total": 200, "per_class": None}}) == "lwf (with memory 200)"
    assert method_label("lwf", {"memory": {"total": None, "per_class": 20}}) == "lwf (with memory 20 per class)"
    assert method_label("lwf", {"memory": {"total": 0}}) == "lwf"
    assert method_label("finetune", {"memory": {"total": 200}}) == "finetune"
    assert method_label("lwf", None) == "lwf"


def test_runs_of_a_method_group_over_options_an_older_cilkit_did_not_write():
    defaults = {"loss": "bce", "bce_reduction": "sum", "temperature": 2.0, "lambda_kd": 1.0}
    older = _method_options({"method": "lwf"}, {"lwf": defaults})
    assert older == _method_options({"method": "lwf"}, {"lwf": {**defaults, "allow_memory": False}})
    assert older != _method_options({"method": "lwf"}, {"lwf": {**defaults, "loss": "ce_kd"}})


# ----- end to end ----------------------------------------------------------------------------------
def _write_config(tmp_path: Path, **extra: object) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**tiny_dict(tmp_path), "threads": 1, "train": {"epochs": 1, "batch_size": 64},
                                    "scenario": {"initial": 4, "increment": 3, "states": 2}, **extra}))
    return path


@pytest.mark.slow
def test_one_command_runs_both_protocols_each_with_its_table(tmp_path, capsys):
    config = _write_config(tmp_path)
    out = tmp_path / "cmp"
    assert main(["run", str(config), "--methods", "finetune,lwf", "--set", "lwf:memory.total=0", "--jobs", "2",
                 "--out", str(out)]) == 0
    lwf = json.loads((out / "lwf" / "results.json").read_text())
    finetune = json.loads((out / "finetune" / "results.json").read_text())
    assert [s["memory_size"] for s in lwf["states"]] == [0, 0]
    assert [s["memory_size"] for s in finetune["states"]] == [60, 60]
    assert yaml.safe_load((out / "lwf" / "config.yaml").read_text())["memory"]["total"] == 0
    report = out / "report"
    md = (report / "table.md").read_text()
    first, second = md.split("Protocol 2:")
    assert "Protocol 1:" in first and "memory 60 exemplars" in first and "| finetune |" in first
    assert "memory none" in second and "| lwf |" in second and "| lwf |" not in first
    rows = list(csv.DictReader(io.StringIO((report / "table.csv").read_text())))
    assert [(r["protocol"], r["method"]) for r in rows] == [("1", "finetune"), ("2", "lwf")]
    html = (report / "report.html").read_text()
    assert "<h3>Protocol 1</h3>" in html and "<h3>Protocol 2</h3>" in html
    # the other method's numbers are those of its run alone
    alone = tmp_path / "alone"
    assert main(["run", str(config), "--set", "method=finetune", "--out", str(alone)]) == 0
    assert strip_timings(finetune)["states"] == strip_timings(json.loads((alone / "results.json").read_text()))["states"]
    # a resume of the parent finds both runs finished (each run's config is the one it was made with)
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 0
    assert "2 of 2 runs finished already" in capsys.readouterr().out


@pytest.mark.slow
def test_lwf_allowed_a_memory_carries_it_in_its_label_everywhere(tmp_path, capsys):
    config = _write_config(tmp_path)
    out = tmp_path / "r"
    assert main(["run", str(config), "--set", "method=lwf", "--set", "lwf.allow_memory=true", "--out", str(out)]) == 0
    label = "lwf (with memory 60)"
    log = (out / "run.log").read_text()
    assert f"[{label}] state 1/2" in log and "[lwf] " not in log
    report = out / "report"
    assert f"| {label} |" in (report / "table.md").read_text()
    assert [r["method"] for r in csv.DictReader(io.StringIO((report / "table.csv").read_text()))] == [label]
    assert f"<td>{label}</td>" in (report / "report.html").read_text()
    assert f"{label}" in (report / "table.tex").read_text()
