"""Two methods share a state-0 cache entry only when they train state 0 to the same model,
number for number. For every registered method (with its quick settings) and a few option
variants: a method that declares its state 0 another's (``Method.state0_like``) gets that
method's entry; and one whose entry is fine-tuning's (declared, or by an identical signature:
IL2M, ScaIL) trains state 0 to fine-tuning's model, and a run that takes fine-tuning's entry
gives the numbers of a cold run."""

from __future__ import annotations

import pytest
import torch
from helpers import method_cases, strip_timings, tiny_config

from cilkit.run.loop import Run

COMMON = ["threads=1", "train.epochs=1", "scenario.states=2"]
# option settings under which a method declares its state 0 fine-tuning's
VARIANTS = {"lwf-ce_kd": ("lwf", ["lwf.loss=ce_kd"]), "wa-pycil": ("wa", ["wa.bias=true", "wa.clip=incremental"])}


def _config(tmp_path, name, options, cache):
    return tiny_config(tmp_path, f"method={name}", *COMMON, f"state0_cache={cache}", *options)


def _entry(tmp_path, name, options):
    """The run of ``name`` (not executed) and the name of the state-0 cache entry it would use
    (a digest of its key)."""
    run = Run(_config(tmp_path / name, name, options, tmp_path / "cache"), tmp_path / name / "run", progress=False)
    entry = run.state0_entry()
    assert entry is not None
    return run, entry.path.name


def _state0_model(tmp_path, name, options):
    run = Run(_config(tmp_path / name, name, options, "null"), tmp_path / name / "cold0", progress=False)
    run.execute(until_state=0)
    return run.model.state_dict()


@pytest.mark.parametrize("name, options", method_cases(VARIANTS))
def test_a_shared_state0_entry_holds_the_same_state0_model(tmp_path, name, options):
    run, mine = _entry(tmp_path, name, options)
    like = run.method.state0_like()
    if like is not None:  # the declaration takes effect: the other method's entry
        assert mine == _entry(tmp_path / "like", like.name, options)[1]
    if name == "finetune" or mine != _entry(tmp_path / "ref", "finetune", options)[1]:
        return  # fine-tuning's entry is not this method's: nothing shared to check
    reference = _state0_model(tmp_path / "ref", "finetune", options)
    model = _state0_model(tmp_path, name, options)
    assert model.keys() == reference.keys()
    assert all(torch.equal(model[k], reference[k]) for k in reference), f"{name} shares fine-tuning's state-0 entry"
    cache = tmp_path / "shared"
    Run(_config(tmp_path, "finetune", options, cache), tmp_path / "ft", progress=False).execute()
    hit = Run(_config(tmp_path, name, options, cache), tmp_path / "hit", progress=False).execute()
    cold = Run(_config(tmp_path, name, options, "null"), tmp_path / "cold", progress=False).execute()
    assert hit["states"][0]["state0_cached"] is True
    assert strip_timings(hit) == strip_timings(cold)


def test_the_methods_that_share_fine_tunings_state0(tmp_path):
    """What the test above checks, written out for the built-in methods: a change that stops a
    method from sharing (or makes it share by mistake) shows here, not as a vacuous pass."""
    shared = set()
    for case in method_cases(VARIANTS):
        name, options = case.values
        if name != "finetune" and (_entry(tmp_path / case.id, name, options)[1]
                                   == _entry(tmp_path / case.id / "ref", "finetune", options)[1]):
            shared.add(case.id)
    assert {"eeil", "il2m", "scail", "ssil", "lwf-ce_kd", "wa-pycil"} <= shared
    assert not {"icarl", "lucir", "lwf", "wa", "gdumb", "joint", "bic", "podnet"} & set(shared)
