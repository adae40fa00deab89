"""Issue 37 items 1 and 6: a run whose training goes non-finite is never a result, and no file a
tool reads passes a NaN or an infinity off as a number.

Item 1 (a diverged run), cases:
- a NaN loss in the first epoch (``train.lr=1e30``) stops a single run there: exit status 2, one
  line naming the state, the stage and epoch, the loss term and what to try; no results.json,
  diverged.json says where, history.jsonl holds no non-finite number;
- a term whose weight blows the model up in state 2 (``wa.lambda_kd=1e12``) is the term named
  (``kd``, not the ``ce`` that goes NaN with it) with the option that weights it; state 1's
  checkpoint stays, the directory is marked diverged and not finished, and ``--resume`` continues
  from that checkpoint (and, same config, diverges again in state 2);
- parameters that go non-finite while the epoch's loss stayed finite stop the run too;
- the stall check is not fooled by NaN (``nan >= x`` is always false);
- ``--methods finetune,wa``: the other run finishes, the diverged one is one line and is listed
  under the table, not a row; a ``runs: R`` summary averages the runs that did not diverge;
- ``cilkit compare`` lists a diverged run (method, seed, state, epoch, term), and refuses when
  every run diverged; ``cilkit calibrate`` refuses a diverged run;
- ``cilkit tune`` scores a diverged grid point as failed (no score, ``diverged`` in ranking.json,
  last) and goes on; ``--search`` lists a diverged trial the same way.

Item 6 (NaN read as a number), cases:
- NaN logits in scores/state_XX.npz: calibrate refuses, naming the file and the array;
- a NaN top-1 in results.json: compare refuses, naming the file and the key;
- a NaN in a state's class statistics: calibrate --with il2m refuses, naming the file and key;
- a score set may hold -inf (a class it cannot predict) but not NaN; logits may hold neither.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import one_error_line, tiny_config, tiny_dict

from cilkit.cli import main
from cilkit.common.errors import RunDiverged, UserError
from cilkit.rundir.readers import read_scores
from cilkit.run.health import stalled
from cilkit.run.loop import Run
from cilkit.runs.jobs import RunJob, finished
from cilkit.runs.multirun import diverged_results, write_summary
from cilkit.runs.tune import tune

WA_BLOWS_UP = ["method=wa", "wa.lambda_kd=1e12"]  # NaN from state 2 on (issue 37's reproduction)


def config_file(tmp_path: Path, **changes) -> Path:
    """A tiny config file (one thread, no state-0 cache) with ``changes`` (dotted keys) set."""
    data = tiny_dict(tmp_path) | {"threads": 1, "state0_cache": None}
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (data.setdefault(section, {}) if section else data)[name] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def history_numbers(run_dir: Path) -> list[float]:
    """Every loss and term mean of the run's history.jsonl (none when no epoch was recorded)."""
    path = run_dir / "history.jsonl"
    lines = [json.loads(t) for t in path.read_text().splitlines()] if path.exists() else []
    return [v for line in lines if line["kind"] == "epoch" for v in (line["loss"], *line["terms"].values())]


def diverged_run(base: Path, *overrides: str) -> Path:
    """A run of the tiny config with ``overrides`` that diverges (its RunDiverged caught)."""
    run_dir = base / "diverged"
    with pytest.raises(RunDiverged):
        Run(tiny_config(base, "threads=1", "state0_cache=null", *overrides), run_dir, progress=False).execute()
    return run_dir


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory) -> Path:
    """A finished 3-state finetune run (1 epoch, one thread)."""
    base = tmp_path_factory.mktemp("finished")
    Run(tiny_config(base, "train.epochs=1", "threads=1", "state0_cache=null"), base / "run", progress=False).execute()
    return base / "run"


@pytest.fixture(scope="module")
def wa_diverged(tmp_path_factory) -> Path:
    """A WA run that diverges in state 2."""
    return diverged_run(tmp_path_factory.mktemp("wa"), *WA_BLOWS_UP)


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoints", "report", "calibrated"))
    return dest


# ----- item 1: the run stops ---------------------------------------------------------------------
def test_a_nan_loss_stops_a_single_run_in_its_first_epoch_with_one_line(tmp_path, capsys):
    """issue 37 item 1: ``train.lr=1e30`` makes the loss NaN in the first epoch: exit 2 and one
    line (state 1, train epoch 1, the term 'ce', a lower train.lr, another seed); no results.json;
    diverged.json records it; the history holds no non-finite number."""
    out = tmp_path / "run"
    assert main(["run", str(config_file(tmp_path, **{"train.lr": 1e30})), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    for part in ("state 1, train epoch 1", "loss term 'ce' is nan", "train.lr", "another seed", "diverged.json"):
        assert part in line, (part, line)
    assert not (out / "results.json").exists()
    record = json.loads((out / "diverged.json").read_text())
    assert (record["state"], record["stage"], record["epoch"], record["term"]) == (1, "train", 1, "ce")
    assert all(math.isfinite(v) for v in history_numbers(out))


def test_a_term_that_blows_up_in_state_2_is_named_and_the_finished_state_is_kept(tmp_path, capsys):
    """issue 37 item 1: ``wa.lambda_kd=1e12``: state 1 trains, state 2 goes NaN in its first
    epoch; the line names 'kd' (whose values grew first; 'ce' goes NaN with it) and
    wa.lambda_kd. State 1's checkpoint is kept, the run is marked diverged (no results.json) and
    not finished; --resume continues after state 1 and, with the same config, diverges again."""
    out = tmp_path / "run"
    config = config_file(tmp_path, method="wa", **{"wa.lambda_kd": 1e12})
    assert main(["run", str(config), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    for part in ("state 2, train epoch 1", "loss term 'kd' is nan", "wa.lambda_kd", "another seed"):
        assert part in line, (part, line)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["state_00.pt"]
    assert (out / "diverged.json").is_file() and not (out / "results.json").exists()
    job = RunJob("wa", out, yaml.safe_load((out / "config.yaml").read_text()))
    assert not finished(job)
    lines = [json.loads(t) for t in (out / "history.jsonl").read_text().splitlines()]
    assert [(ln["kind"], ln["state"]) for ln in lines] == [("epoch", 1), ("epoch", 1), ("state", 1)]
    assert all(math.isfinite(v) for v in history_numbers(out))

    assert main(["run", "--resume", str(out)]) == 2
    assert "state 2, train epoch 1" in one_error_line(capsys)
    assert "resuming" in (out / "run.log").read_text() and (out / "checkpoints" / "state_00.pt").is_file()
    assert (out / "diverged.json").is_file() and not (out / "results.json").exists()


def test_parameters_that_go_non_finite_under_a_finite_loss_stop_the_run(tmp_path):
    """issue 37 item 1: a step that leaves a parameter infinite after the epoch's last batch (the
    epoch's loss still finite) stops the run at that epoch, naming the parameters."""
    run = Run(tiny_config(tmp_path, "threads=1", "state0_cache=null", "train.batch_size=4096"), tmp_path / "run",
              progress=False)  # one batch per epoch: the first step is the epoch's last

    def poison(ctx) -> None:
        next(ctx.model.parameters()).data[0] = float("inf")

    run.method.after_step = poison  # type: ignore[method-assign]
    with pytest.raises(RunDiverged) as caught:
        run.execute()
    assert (caught.value.record["state"], caught.value.record["epoch"]) == (1, 1)
    assert "the parameters are non-finite" in str(caught.value)


def test_the_stall_check_is_not_fooled_by_nan():
    """issue 37 item 1: a fit whose mean loss went NaN or infinite learned nothing (``nan >= x``
    is false, so the check used to pass it); finite losses are judged as before."""
    assert stalled([2.3, float("nan")]) and stalled([float("nan"), float("nan")]) and stalled([2.3, float("inf")])
    assert stalled([2.3, 2.2]) and not stalled([2.3, 1.0]) and not stalled([float("nan")])


# ----- item 1: nothing downstream takes it for a result ------------------------------------------
@pytest.mark.slow
def test_a_comparison_goes_on_past_a_diverged_method(tmp_path, capsys):
    """issue 37 item 1: ``--methods finetune,wa`` with WA diverging: finetune finishes, WA is one
    line, and the comparison table has a finetune row and lists WA as diverged (no row)."""
    out = tmp_path / "both"
    config = config_file(tmp_path, **{"wa.lambda_kd": 1e12})
    assert main(["run", str(config), "--methods", "finetune,wa", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[jobs] wa (seed 3): training diverged in state 2, train epoch 1: the loss term 'kd'" in printed
    assert (out / "finetune" / "results.json").is_file() and not (out / "wa" / "results.json").exists()
    table = (out / "report" / "table.md").read_text()
    rows = [t.split("|")[1].strip() for t in table.splitlines() if t.startswith("| ") and "---" not in t]
    assert "finetune" in rows and "wa" not in rows
    assert "- wa, seed 3: diverged in state 2, train epoch 1: the loss term 'kd' is nan" in table


def test_compare_lists_a_diverged_run_and_calibrate_refuses_it(tmp_path, capsys, finetune_run, wa_diverged):
    """issue 37 item 1: compare of a finished and a diverged run: one row, and the diverged one
    listed (method, seed, state, epoch, term); a baseline that diverged, compare of the diverged
    run alone and calibrate of it are one line each, exit 2."""
    assert main(["compare", str(finetune_run), str(wa_diverged), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "| finetune |" in table and "| wa |" not in table
    assert "- wa, seed 3: diverged in state 2, train epoch 1: the loss term 'kd' is nan" in table
    assert "diverged in state 2" in (tmp_path / "cmp" / "report.html").read_text()
    capsys.readouterr()
    assert main(["compare", str(finetune_run), str(wa_diverged), "--baseline", "wa", "--out", str(tmp_path / "b")]) == 2
    assert "--baseline 'wa': the training of its run diverged" in one_error_line(capsys)
    assert main(["compare", str(wa_diverged), "--out", str(tmp_path / "alone")]) == 2
    assert "every run named diverged" in one_error_line(capsys)
    assert main(["calibrate", str(wa_diverged), "--with", "none"]) == 2
    assert "diverged in state 2" in one_error_line(capsys)


def test_a_summary_over_seeds_leaves_a_diverged_seed_out(tmp_path, finetune_run):
    """issue 37 item 1: summary.json of ``runs: 2`` whose second seed diverged: the mean is the
    first seed's figure alone, and the diverged seed is named."""
    results = json.loads((finetune_run / "results.json").read_text())
    config = tiny_config(tmp_path, "runs=2")
    record = {"method": "finetune", "seed": 4, "state": 2, "stage": "train", "epoch": 1, "term": "ce",
              "message": "diverged"}
    write_summary(config, tmp_path, {"finetune/run_0": results, "finetune/run_1": diverged_results(record)})
    summary = json.loads((tmp_path / "summary.json").read_text())["methods"]["finetune"]
    assert summary["diverged_seeds"] == [4]
    key = "mean_incremental_top1_excl_first"
    assert summary[key]["mean"] == results[key] and summary[key]["values"] == [results[key]]


def tune_config(tmp_path: Path) -> Path:
    return config_file(tmp_path, method="wa", **{"scenario.val_per_class": 5, "train.epochs": 1})


def test_tune_scores_a_diverged_point_as_failed_and_goes_on(tmp_path):
    """issue 37 item 1: a grid of wa.lambda_kd = 1 and 1e12: the 1e12 point diverges; it has no
    score, ranks last and is marked diverged (seed, state, epoch, term) in ranking.json and
    ranking.md; the other point is scored and chosen."""
    out = tmp_path / "tune"
    record = tune(str(tune_config(tmp_path)), ["wa.lambda_kd=1,1e12"], [], out)
    first, last = record["ranking"]
    assert first["values"] == {"wa.lambda_kd": "1"} and first["val_score_mean"] is not None
    assert "diverged" not in first
    assert last["values"] == {"wa.lambda_kd": "1e12"} and last["val_score_mean"] is None
    assert [(d["seed"], d["state"], d["epoch"], d["term"]) for d in last["diverged"]] == [(3, 2, 1, "kd")]
    assert json.loads((out / "ranking.json").read_text())["ranking"][1]["diverged"] == last["diverged"]
    assert "| 2 | 1e12 | diverged |" in (out / "ranking.md").read_text()
    assert record["set_line"] == "--set wa.lambda_kd=1"


@pytest.mark.slow
def test_search_lists_a_diverged_trial_without_a_score(tmp_path):
    """issue 37 item 1: ``tune --search random`` over wa.lambda_kd in 1e4..1e16 (log): the trials
    that drew a weight large enough to diverge are told failed and listed in the ranking as
    diverged, without a score, after the scored ones."""
    from cilkit.runs.search import search

    out = tmp_path / "search"
    record = search(str(tune_config(tmp_path)), {}, ["wa.lambda_kd=1e4:1e16:log"], [], out, "random", 3)
    blown = [r for r in record["ranking"] if r.get("diverged")]
    assert blown and len(blown) < len(record["ranking"]) == 3
    assert all(r["val_score_mean"] is None and r["diverged"][0]["term"] == "kd" for r in blown)
    assert record["ranking"][-len(blown):] == blown
    assert all(r["val_score_mean"] is not None for r in record["ranking"][:-len(blown)])


# ----- item 6: no NaN read as a number -----------------------------------------------------------
def test_nan_logits_are_refused_by_calibrate(tmp_path, capsys, finetune_run):
    """issue 37 item 6: a NaN among the logits of scores/state_01.npz: calibrate is one line
    naming the file and the array, exit 2 (it used to rectify them into another accuracy)."""
    run = copy_run(finetune_run, tmp_path / "run")
    path = run / "scores" / "state_01.npz"
    arrays = dict(np.load(path))
    arrays["logits"][3, 1] = np.nan
    np.savez(path, **arrays)
    assert main(["calibrate", str(run), "--with", "none"]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "'logits'" in line and "NaN" in line


def test_a_nan_top1_in_results_json_is_refused_by_compare(tmp_path, capsys, finetune_run):
    """issue 37 item 6: results.json with a NaN top-1 of state 2 (Python's json writes NaN):
    compare is one line naming the file and 'states[1].top1', never a "nan" in a table."""
    run = copy_run(finetune_run, tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    results["states"][1]["top1"] = float("nan")
    (run / "results.json").write_text(json.dumps(results))
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 2
    line = one_error_line(capsys)
    assert str(run / "results.json") in line and "'states[1].top1'" in line
    assert not (tmp_path / "cmp").exists()


def test_nan_in_class_statistics_is_refused_by_calibrate(tmp_path, capsys, finetune_run):
    """issue 37 item 6: a NaN initial mean in stats/state_01.json: calibrate --with il2m is one
    line naming the file and the key."""
    run = copy_run(finetune_run, tmp_path / "run")
    path = run / "stats" / "state_01.json"
    stats = json.loads(path.read_text())
    stats["init_mean"]["2"] = float("nan")
    path.write_text(json.dumps(stats))
    assert main(["calibrate", str(run), "--with", "il2m"]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "'init_mean.2'" in line


def test_a_score_set_may_hold_minus_infinity_but_not_nan(tmp_path):
    """issue 37 item 6: NME-style scores with -inf (a class without a mean) are read; NaN or
    +inf in a score set, and any infinity in the logits, is refused naming the array."""
    path = tmp_path / "state_00.npz"
    logits = np.zeros((4, 3), dtype=np.float32)
    scores = logits.copy()
    scores[:, 2] = -np.inf
    np.savez(path, logits=logits, scores=scores, labels=np.arange(4) % 3)
    read_scores(path, "logits", "scores", "labels")
    for key, value in (("scores", np.nan), ("scores", np.inf), ("logits", -np.inf)):
        bad = {"logits": logits.copy(), "scores": scores.copy()}
        bad[key][1, 1] = value
        np.savez(path, **bad, labels=np.arange(4) % 3)
        with pytest.raises(UserError, match=f"'{key}' holds 1 NaN or infinite value"):
            read_scores(path, "logits", "scores", "labels")
