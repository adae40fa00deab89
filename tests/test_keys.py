"""The one declaration of what shapes the numbers (cilkit.settings.keys) drives the state-0 cache key,
the --resume check and compare's grouping."""

from __future__ import annotations

import pytest
import yaml
from helpers import registered_methods, tiny_config
from pydantic import BaseModel, Field

from cilkit.analysis.runsets import FoundRun, group_runs
from cilkit.settings.config import RunConfig, TrainConfig
from cilkit.common.errors import UserError
from cilkit.settings.keys import (KEYS, METHOD_OPTIONS, Key, Role, config_differences, option_key, protocol_settings,
                         resume_warnings, stale_keys, state0_settings, undeclared_keys)
from cilkit.methods.base import MethodConfig
from cilkit.settings.options import is_declared, option
from cilkit.settings.registry import METHODS
from cilkit.rundir.layout import RunLayout
from cilkit.run.loop import Run


def test_every_config_key_is_declared_once():
    assert undeclared_keys(RunConfig) == []  # every leaf of RunConfig has its declaration
    assert stale_keys(RunConfig) == []  # and nothing is declared that is gone


def test_a_new_config_key_without_a_declaration_is_caught():
    class NewTrain(TrainConfig):
        warmup_epochs: int = 0

    class NewConfig(RunConfig):
        train: NewTrain = Field(default_factory=NewTrain)

    assert undeclared_keys(NewConfig) == ["train.warmup_epochs"]

    class Small(BaseModel):
        seed: int = 0

    assert "train.lr" in stale_keys(Small) and "seed" not in stale_keys(Small)


def test_every_method_option_is_declared_on_its_field():
    for name in registered_methods():
        for key, field in METHODS[name].Config.model_fields.items():
            assert is_declared(field) and field.description, f"{name}.{key}: declare it with cilkit.settings.options.option"


@pytest.fixture
def keys_method():
    """A method registered for one test: a plain field ``a`` and a declared one ``b``."""

    class Cfg(MethodConfig):
        a: float = Field(1.0)
        b: float = option(1.0, help="free to change", state0=False, resume="free")

    class KeysMethod(METHODS["finetune"]):  # type: ignore[misc,valid-type]
        Config = Cfg

    METHODS["keys_test"] = KeysMethod
    yield "keys_test"
    del METHODS["keys_test"]


def test_a_method_option_key_is_its_fields_declaration(keys_method):
    assert option_key("lucir.lambda_base") == Key(Role.IDENTITY, False, "keep")
    assert option_key("bic.val_ratio") == Key(Role.IDENTITY, True, "keep")
    assert option_key("keys_test.b") == Key(Role.IDENTITY, False, "free")
    assert option_key("keys_test.a") == Key(Role.IDENTITY, True, "keep")  # a plain field: the safe default
    assert option_key("keys_test.nope") is METHOD_OPTIONS and option_key("nosuch.x") is METHOD_OPTIONS
    then = RunConfig.model_validate({"method": "keys_test"}).to_dict()
    now = {**then, "keys_test": {"a": 2.0, "b": 3.0}}
    assert config_differences(now, then) == ["keys_test.a"]  # b declares that a resume may change it
    assert not {k for k in state0_settings(now, "keys_test") if k.startswith("keys_test")}  # the method's signature keys them


def test_the_declaration_by_hand():
    # a few keys whose role a user relies on, written out
    assert KEYS["seed"].role is Role.IDENTITY and KEYS["memory.total"].role is Role.PROTOCOL
    assert KEYS["threads"].role is Role.EXECUTION and KEYS["threads"].resume == "warn"
    assert KEYS["device"].resume == "keep" and KEYS["log.tensorboard"].resume == "free"
    assert KEYS["amp"].role is Role.PROTOCOL  # bf16 is a protocol of its own


def test_resume_check_refuses_kept_keys_and_warns_for_threads():
    then = RunConfig().to_dict()
    now = RunConfig.model_validate({**then, "threads": 3, "name": "x", "memory": {"total": 5},
                                    "finetune": {"reinit_classifier": True}}).to_dict()
    assert config_differences(now, then) == ["finetune.reinit_classifier", "memory.total"]
    assert resume_warnings(now, then) == ["threads"]


def test_resume_of_a_run_whose_config_changed_a_kept_key_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, "scenario.states=2", "threads=1")
    Run(cfg, tmp_path / "r", progress=False).execute(until_state=0)
    data = yaml.safe_load(RunLayout(tmp_path / "r").config.read_text())
    edited = RunConfig.model_validate({**data, "memory": {**data["memory"], "total": 40}})
    with pytest.raises(UserError, match="memory.total"):
        Run(edited, tmp_path / "r", progress=False).execute(resume=True)
    renamed = RunConfig.model_validate({**data, "name": "other", "keep_checkpoints": "all"})
    Run(renamed, tmp_path / "r", progress=False).execute(resume=True)  # keys that shape no number


def test_state0_cache_key_holds_execution_settings_but_not_later_states_keys(tmp_path):
    base = RunConfig().to_dict()
    s0 = state0_settings(base, "finetune")
    assert {"threads", "compile", "device", "channels_last", "amp", "seed", "train.batch_size"} <= set(s0)
    assert not {k for k in s0 if k.startswith(("memory.", "scenario.increment", "log.", "finetune"))}
    a = Run(tiny_config(tmp_path, "threads=1"), tmp_path / "a", progress=False).state0_entry()
    b = Run(tiny_config(tmp_path, "threads=2"), tmp_path / "b", progress=False).state0_entry()
    c = Run(tiny_config(tmp_path, "threads=1", "memory.total=30"), tmp_path / "c", progress=False).state0_entry()
    assert a is not None and a.path != b.path  # threads move the last digits
    assert a.path == c.path  # the memory is filled after state 0 trains


def _found(tmp_path, name, config, method="finetune"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"method": method, "dataset": "digits", "class_order": [0, 1], "state_ends": [1, 2], "states": []}
    return FoundRun(name, d, results)


def test_compare_groups_by_protocol_keys_only(tmp_path):
    base = RunConfig().to_dict()
    runs = [
        _found(tmp_path, "a", {**base, "seed": 0}),
        _found(tmp_path, "b", {**base, "seed": 1, "threads": 7, "device": "cpu", "compile": True}),
        _found(tmp_path, "c", {**base, "seed": 0, "memory": {**base["memory"], "total": 99}}),
    ]
    protocols = group_runs(runs)
    assert len(protocols) == 2  # threads, device, compile and the seed are no part of a protocol
    assert [[r.path.name for r in g.runs] for g in protocols[0].groups] == [["a", "b"]]  # two seeds, one group
    assert [[r.path.name for r in g.runs] for g in protocols[1].groups] == [["c"]]
    settings = protocol_settings(base, base)
    assert "memory.total" in settings and "amp" in settings
    assert not {"seed", "threads", "device", "compile", "method", "name"} & set(settings)
