"""A run killed after state 2 or 3 (not only 1) and resumed gives exactly the numbers, scores and
memory of an uninterrupted run, for every registered method (with its quick settings) and a few
option variants."""

import json

import numpy as np
import pytest
from helpers import method_cases, strip_timings, tiny_config

from cilkit.run.loop import Run

# paths the defaults do not take, beside every registered method with its quick settings
VARIANTS = {
    "sir-podnet": ("sir", ["sir.base=podnet", "podnet.proxies_per_class=3", "podnet.finetune_epochs=1"]),
    "active-margin": ("active", ["active.classical=margin"]),
    "finetune-reinit": ("finetune", ["finetune.reinit_classifier=true"]),
}
# fine-tuning in the fast tests (pytest -m "not slow"), every other method and variant in the full suite
CASES = [case if case.id == "finetune" else pytest.param(*case.values, id=case.id, marks=pytest.mark.slow)
         for case in method_cases(VARIANTS)]


def four_states(tmp_path, name, options):
    return tiny_config(tmp_path, f"method={name}", "scenario.increment=2", "scenario.states=4", "train.epochs=1",
                       "state0_cache=null", "memory.total=80", "threads=1", *options)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted 4-state run per method, made on first use."""
    done = {}

    def get(name, options):
        key = (name, *options)
        if key not in done:
            d = tmp_path_factory.mktemp(f"full-{name}")
            done[key] = (Run(four_states(d, name, options), d / "run", progress=False).execute(), d / "run")
        return done[key]

    return get


def _files(run_dir, pattern):
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.glob(pattern))


@pytest.mark.parametrize("name, options", CASES)
@pytest.mark.parametrize("cut", [1, 2])  # killed after state 2 / state 3 (0-based 1 / 2)
def test_a_run_cut_after_a_later_state_resumes_to_the_uninterrupted_results(tmp_path, uninterrupted, name, options,
                                                                             cut):
    full, full_dir = uninterrupted(name, options)
    cfg = four_states(tmp_path, name, options)
    cut_dir = tmp_path / "cut"
    partial = Run(cfg, cut_dir, progress=False).execute(until_state=cut)
    assert len(partial["states"]) == cut + 1 and not partial["complete"]
    resumed = Run(cfg, cut_dir, progress=False).execute(resume=True)
    assert resumed["complete"]
    assert strip_timings(resumed) == strip_timings(full)
    for b in range(4):
        x = np.load(full_dir / "scores" / f"state_{b:02d}.npz")
        y = np.load(cut_dir / "scores" / f"state_{b:02d}.npz")
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            assert np.array_equal(x[key], y[key]), (b, key)
        mem = [json.loads((d / "memory" / f"state_{b:02d}.json").read_text()) for d in (full_dir, cut_dir)]
        assert mem[0] == mem[1]
    # the method's own records (bic/, active/, stats/) are the same files with the same content
    for pattern in ("bic/*.json", "active/*.json", "stats/*"):
        names = _files(full_dir, pattern)
        assert names == _files(cut_dir, pattern)
        for name in names:
            assert (full_dir / name).read_bytes() == (cut_dir / name).read_bytes(), name
