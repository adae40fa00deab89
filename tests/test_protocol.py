"""The hook protocol's promises: a method built on another gets every hook of its base, the
context and what the state trained on cannot be changed in place, and no method does what the
engine owns (a teacher's forward, a gradient hook, an optimiser, a training loop)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

import cilkit
from cilkit.methods.base import FORWARDED, BuildsOn
from cilkit.methods.sir import SIR
from cilkit.training.protocol import FitHooks, Method, TrainingRecord

from helpers import tiny_config

METHODS_DIR = Path(cilkit.__file__).parent / "methods"


def _public_hooks() -> set[str]:
    """Every public function of the protocol's classes, read off the classes here."""
    names = set()
    for cls in (FitHooks, Method):
        for name, value in cls.__dict__.items():
            if inspect.isfunction(value) and not name.startswith("_"):
                names.add(name)
    return names


def test_a_method_built_on_another_forwards_every_hook_but_its_state0_identity():
    assert set(FORWARDED) == _public_hooks() - {"state0_like", "state0_signature"}


@pytest.mark.parametrize("hook", ["after_step", "memory_contents", "fit_spec", "teacher", "param_groups",
                                  "batch_order", "train_mode", "statistics_warnings"])
def test_sir_hands_a_hook_it_does_not_define_to_its_base(tmp_path, hook):
    sir = SIR(tiny_config(tmp_path, "method=sir", "sir.base=lucir"))
    assert isinstance(sir, BuildsOn) and type(sir.base).__name__ == "LUCIR"
    calls = []
    setattr(sir.base, hook, lambda *args, **kwargs: calls.append(args) or "answer")
    assert getattr(sir, hook)("ctx", 1, 2) == "answer" and calls == [("ctx", 1, 2)]


def test_sir_takes_the_class_attributes_the_runner_and_engine_read_from_its_base(tmp_path):
    sir = SIR(tiny_config(tmp_path, "method=sir", "sir.base=podnet"))
    assert sir.needs_teacher and sir.needs_stages and sir.classification_term == "nca"
    assert not SIR(tiny_config(tmp_path, "method=sir")).needs_stages  # on fine-tuning


def test_what_a_state_trained_on_is_a_new_record_never_a_changed_one():
    record = TrainingRecord(old_exemplars=torch.arange(3))
    later = record.with_round(torch.arange(5)).with_new_images(torch.arange(2))
    assert record.rounds == () and len(later.rounds) == 1 and later.new_images.numel() == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        later.rounds = ()  # type: ignore[misc]


def _calls_in_methods() -> list[tuple[str, int, str]]:
    """(file, line, what) for each call in cilkit/methods that is the engine's to make."""
    found = []
    for path in sorted(METHODS_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            text = ast.unparse(node.func)
            if (text.endswith(("register_hook", "register_full_backward_hook", ".backward"))
                    or text.startswith("torch.optim.") or text in ("ctx.teacher", "teacher")
                    or text.endswith(".teacher") and not text.startswith("self.")):
                found.append((str(path.relative_to(METHODS_DIR)), node.lineno, text))
    return found


def test_no_method_runs_a_teacher_forward_registers_a_hook_or_builds_an_optimiser():
    assert _calls_in_methods() == []


def test_the_scan_finds_what_it_forbids(tmp_path, monkeypatch):
    """The scan above can fail: a method file that runs the teacher itself is reported."""
    fake = tmp_path / "methods"
    fake.mkdir()
    (fake / "bad.py").write_text("def loss(ctx, batch):\n    return ctx.teacher(batch.x)\n"
                                 "def clamp(p):\n    p.register_hook(lambda g: g)\n")
    monkeypatch.setattr(__import__(__name__), "METHODS_DIR", fake)
    assert [w for _, _, w in _calls_in_methods()] == ["ctx.teacher", "p.register_hook"]
