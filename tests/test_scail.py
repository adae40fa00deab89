"""ScaIL (Belouadah & Popescu, WACV 2020) against a transcription of its authors' rectification
loop (``scail/codes/scail.py``: numpy, per class and dimension, with their sklearn normalize),
and the live method against ``cilkit calibrate --with scail`` of a fine-tuning run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_config
from sklearn import preprocessing

from cilkit.analysis.calibrate import calibrate_run
from cilkit.cli import main
from cilkit.cil.rectify import scail_classifier, scail_scores
from cilkit.runs.multirun import run_methods


def authors_loop(heads, ends, features, top_rewinded):
    """The authors' script for one state b (0-based: len(ends) - 1): heads[s] = (W, bias) of
    state s, transcribed loop for loop in float64."""
    b = len(ends) - 1
    w_now, b_now = (h.double().numpy() for h in heads[b])
    n_old, n_seen = ends[b - 1], ends[b]
    w_now, b_now = w_now[:n_seen], b_now[:n_seen]
    sum_new_bias = np.sum(preprocessing.normalize(np.abs(b_now).reshape(-1, 1), norm="l2"))
    mean_dim_new = np.mean(-np.sort(-np.abs(w_now[n_old:n_seen, :])), axis=0)
    scaled_w, scaled_b = w_now.copy(), b_now.copy()
    for s in range(b):
        w0, b0 = (h.double().numpy() for h in heads[s])
        lo, hi = (ends[s - 1] if s else 0), ends[s]
        sum_init_bias = np.sum(preprocessing.normalize(np.abs(b0).reshape(-1, 1), norm="l2"))
        scaled_b[lo:hi] = b0[lo:hi] * (sum_new_bias / sum_init_bias)
        mean_dim_old = np.mean(-np.sort(-np.abs(w0[lo:hi, :])), axis=0)
        factor = mean_dim_new / mean_dim_old
        for label in range(lo, hi):
            argsrt = np.argsort(-w0[label, :], kind="stable")
            for dim in range(w0.shape[1]):
                scaled_w[label][dim] = w0[label][dim] * factor[argsrt[dim]]
    scores = []
    for f in features.double().numpy():
        current = f.dot(w_now.T) + b_now
        rect = f.dot(scaled_w.T) + scaled_b
        top_old = np.argsort(-current[:n_old], kind="stable")[:top_rewinded]
        for o in range(n_old):
            if o not in top_old:
                rect[o] = -np.inf
        scores.append(rect)
    return scaled_w, scaled_b, np.array(scores)


def _heads(ends, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(e, dim, generator=g), torch.randn(e, generator=g)) for e in ends]


@pytest.mark.parametrize("ends,top", [([3, 5, 8], 2), ([4, 6], 10), ([2, 4, 6, 8], 3)])
def test_the_classifier_and_scores_are_the_authors_loop(ends, top):
    heads = _heads(ends, seed=len(ends))
    feats = torch.rand(7, 6, generator=torch.Generator().manual_seed(9))
    w, b = heads[-1]
    scaled = scail_classifier(w, b, heads[:-1], ends)
    ref_w, ref_b, ref_scores = authors_loop(heads, ends, feats, top)
    assert np.allclose(scaled[0].numpy(), ref_w, atol=1e-12) and np.allclose(scaled[1].numpy(), ref_b, atol=1e-12)
    ours = scail_scores(feats, w, b, scaled, ends[-2], top).double().numpy()
    assert np.array_equal(np.isinf(ours), np.isinf(ref_scores))
    assert np.allclose(ours[np.isfinite(ours)], ref_scores[np.isfinite(ref_scores)], atol=1e-5)


def test_the_rank_reading_scales_the_kth_largest_weight_by_the_kth_factor():
    ends = [3, 5]
    heads = _heads(ends, dim=4, seed=3)
    (w0, b0), (w, b) = heads
    mu_new = np.sort(np.abs(w[3:5].double().numpy()), axis=1)[:, ::-1].mean(axis=0)
    mu_old = np.sort(np.abs(w0[0:3].double().numpy()), axis=1)[:, ::-1].mean(axis=0)
    expected = w[:5].double().numpy().copy()
    for c in range(3):
        row = w0[c].double().numpy()
        for k, d in enumerate(np.argsort(-np.abs(row), kind="stable")):
            expected[c, d] = row[d] * mu_new[k] / mu_old[k]
    got = scail_classifier(w, b, heads[:1], ends, reading="rank")[0].numpy()
    assert np.allclose(got, expected, atol=1e-12)
    assert not np.allclose(got, scail_classifier(w, b, heads[:1], ends, reading="code")[0].numpy())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("scail")
    run_methods(tiny_config(d, "method=[finetune,scail]", "threads=1", "scail.top_rewinded=2"), d / "cmp",
                progress=False)
    return d / "cmp"


def test_live_scail_equals_calibrated_finetune(pair, tmp_path):
    """The live method (top_rewinded 2 here) and calibrate --with scail (the default, 10) read the
    same stored features and classifiers: with top_rewinded at least the old classes' count,
    both keep every old class; so compare the live run with the top rewinding applied to the
    calibrated scores by hand."""
    out = calibrate_run(pair / "finetune", "scail", tmp_path / "cal", echo=False)[""]
    live = json.loads((pair / "scail" / "results.json").read_text())
    ft = json.loads((pair / "finetune" / "results.json").read_text())
    assert out["primary_scores"] == "scail" and out["method"] == "finetune+scail"
    for b in range(3):
        a = np.load(pair / "scail" / "scores" / f"state_{b:02d}.npz")
        f = np.load(pair / "finetune" / "scores" / f"state_{b:02d}.npz")
        assert np.array_equal(a["logits"], f["logits"])  # the same training: ScaIL is fine-tuning's model
        c = np.load(tmp_path / "cal" / "scores" / f"state_{b:02d}.npz")["scores"]
        if b == 0:
            assert np.array_equal(c, f["logits"]) and np.array_equal(a["scores"], f["logits"])
            continue
        n_old = ft["state_ends"][b - 1]
        current = f["features"].astype(np.float64) @ f["head_weight"].astype(np.float64).T + f["head_bias"]
        top2 = np.argsort(-current[:, :n_old], axis=1, kind="stable")[:, :2]
        masked = c.copy()
        for i in range(len(c)):  # calibrate kept all old classes (10 >= n_old): mask all but the top 2
            for o in range(n_old):
                if o not in top2[i]:
                    masked[i, o] = -np.inf
        assert np.array_equal(np.isinf(masked), np.isinf(a["scores"]))
        assert np.array_equal(masked[np.isfinite(masked)], a["scores"][np.isfinite(a["scores"])])
    assert live["states"][-1]["variants"]["cnn"]["top1"] == ft["states"][-1]["top1"]


def test_calibrate_with_scail_equals_the_live_method_with_its_defaults(tmp_path):
    run_methods(tiny_config(tmp_path, "method=[finetune,scail]", "threads=1", "scenario.states=2"), tmp_path / "c",
                progress=False)
    out = calibrate_run(tmp_path / "c" / "finetune", "scail", tmp_path / "cal", echo=False)[""]
    live = json.loads((tmp_path / "c" / "scail" / "results.json").read_text())
    assert [s["top1"] for s in out["states"]] == [s["top1"] for s in live["states"]]
    assert out["mean_incremental_top1"] == live["mean_incremental_top1"]
    a = np.load(tmp_path / "c" / "scail" / "scores" / "state_01.npz")["scores"]
    c = np.load(tmp_path / "cal" / "scores" / "state_01.npz")["scores"]
    assert np.array_equal(a, c) and not np.array_equal(a, np.load(tmp_path / "cal" / "scores" / "state_01.npz")["logits"])


def test_a_run_without_stored_features_is_refused_in_one_line(tmp_path, capsys):
    run_methods(tiny_config(tmp_path, "method=icarl", "threads=1", "scenario.states=2"), tmp_path / "r", progress=False)
    assert main(["calibrate", str(tmp_path / "r"), "--with", "scail"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no test features" in err[0] and "state_00.npz" in err[0]
