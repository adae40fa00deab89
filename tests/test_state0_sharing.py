"""A method that declares it trains state 0 as fine-tuning does (``Method.state0_like``) does
so number for number, and shares fine-tuning's state-0 cache entries; one that does not
declare it never gets them."""

from __future__ import annotations

import pytest
import torch
from helpers import strip_timings, tiny_config

from cilkit.run.loop import Run

LIKE_FINETUNE = {
    "ssil": [], "eeil": ["eeil.finetune_epochs=1"], "scail": [], "lwf": ["lwf.loss=ce_kd"],
    "wa": ["wa.bias=true", "wa.clip=incremental"], "il2m": [],
}
OWN_STATE0 = {"lwf": ["lwf.loss=bce"], "wa": [], "gdumb": [], "icarl": []}


def _state0_model(tmp_path, name, options):
    cfg = tiny_config(tmp_path / name, f"method={name}", "threads=1", "state0_cache=null", "train.epochs=1",
                      "scenario.states=2", *options)
    run = Run(cfg, tmp_path / name / "run", progress=False)
    run.execute(until_state=0)
    return run.model.state_dict()


@pytest.mark.parametrize("name", sorted(LIKE_FINETUNE))
def test_the_declared_state0_is_fine_tunings_model_and_its_cache_entry(tmp_path, name):
    options = LIKE_FINETUNE[name]
    reference = _state0_model(tmp_path, "finetune", [])
    mine = _state0_model(tmp_path, name, options)
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[k], reference[k]) for k in reference), f"{name}'s state 0 is not fine-tuning's"
    cache = tmp_path / "cache"
    common = ["threads=1", "train.epochs=1", "scenario.states=2", f"state0_cache={cache}"]
    Run(tiny_config(tmp_path, "method=finetune", *common), tmp_path / "ft", progress=False).execute()
    hit = Run(tiny_config(tmp_path, f"method={name}", *common, *options), tmp_path / "hit", progress=False).execute()
    cold = Run(tiny_config(tmp_path, f"method={name}", "threads=1", "train.epochs=1", "scenario.states=2",
                           "state0_cache=null", *options), tmp_path / "cold", progress=False).execute()
    assert hit["states"][0]["state0_cached"] is True
    assert strip_timings(hit) == strip_timings(cold)


@pytest.mark.parametrize("name", sorted(OWN_STATE0))
def test_a_method_with_its_own_state0_never_gets_fine_tunings_entry(tmp_path, name):
    common = ["threads=1", "train.epochs=1", "scenario.states=2", f"state0_cache={tmp_path / 'cache'}"]
    Run(tiny_config(tmp_path, "method=finetune", *common), tmp_path / "ft", progress=False).execute()
    other = Run(tiny_config(tmp_path, f"method={name}", *common, *OWN_STATE0[name]), tmp_path / "o",
                progress=False).execute()
    assert other["states"][0]["state0_cached"] is False
