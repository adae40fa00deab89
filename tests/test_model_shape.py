"""A model owns its shape: a grown backbone branch and a named auxiliary head are part of the
model (moved, trained, checkpointed with it), and a resume rebuilds them before the weights
load, so a run resumed after the state that grew them ends exactly as an uninterrupted one.
The method is tests/methods/grow_method.py (registered by conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch

from cilkit.models import GrowingBackbone
from cilkit.run.loop import Run

from helpers import strip_timings, tiny_config


def _cfg(tmp_path):
    return tiny_config(tmp_path, "method=grow_test", "threads=1", "state0_cache=null")


def test_the_grown_branch_and_aux_head_train_and_are_checkpointed(tmp_path):
    run = Run(_cfg(tmp_path), tmp_path / "r", progress=False)
    run.execute(until_state=1)
    model = run.model
    assert isinstance(model.backbone, GrowingBackbone) and len(model.backbone.backbones) == 2
    assert model.backbone.num_frozen == 1
    assert not any(p.requires_grad for p in model.backbone.backbones[0].parameters())
    aux = model.aux_heads["aux"]
    assert aux.linear.out_features == run.scenario.state(1).n_new + 1  # new classes + one "old"
    assert aux.linear.in_features == model.backbone.backbones[1].out_dim  # over the new branch only
    # its weights are in the model's state dict, hence in the checkpoint
    assert any(k.startswith("aux_heads.aux.") for k in model.state_dict())
    # and its loss term reached the history: the auxiliary head trained in state 2
    history = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    epochs2 = [h for h in history if h["kind"] == "epoch" and h["state"] == 2]
    assert epochs2 and all(set(h["terms"]) == {"ce", "aux"} for h in epochs2)
    epochs1 = [h for h in history if h["kind"] == "epoch" and h["state"] == 1]
    assert all(set(h["terms"]) == {"ce"} for h in epochs1)


@pytest.mark.slow
def test_resume_after_the_growing_state_is_bit_exact(tmp_path):
    whole = Run(_cfg(tmp_path), tmp_path / "whole", progress=False).execute()
    Run(_cfg(tmp_path), tmp_path / "cut", progress=False).execute(until_state=1)
    resumed_run = Run(_cfg(tmp_path), tmp_path / "cut", progress=False)  # a fresh process's model: one branch
    assert len(resumed_run.model.backbone.backbones) == 1 and not len(resumed_run.model.aux_heads)
    resumed = resumed_run.execute(resume=True)
    assert strip_timings(resumed["states"]) == strip_timings(whole["states"])
    final = Run(_cfg(tmp_path), tmp_path / "whole2", progress=False)
    final.execute()
    for (k, a), (k2, b) in zip(final.model.state_dict().items(), resumed_run.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
