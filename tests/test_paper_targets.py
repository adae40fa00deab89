"""Issue 41 items 1 and 2: every paper config carries the paper's figure (or says none was
found), and ``cilkit run`` / ``cilkit compare`` put that figure beside the run's."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import tiny_dict

from cilkit.analysis.paper import PaperComparison, protocol_changes, run_figure, why_no_figure
from cilkit.analysis.report import compare_runs
from cilkit.cli import main
from cilkit.settings.config import load_config
from cilkit.settings.packaged import packaged_names
from cilkit.settings.paper import PaperTarget

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "cilkit" / "configs"
NO_FIGURE = "# paper: no figure reported for this protocol was found ("
T_975_2 = 4.303  # Student's t, 0.975 quantile, 2 degrees of freedom (a printed table)


def is_paper_config(name: str) -> bool:
    return "-cifar100-" in name or name.endswith("-imagenet-subset") or name == "active-cifar100"


# ----- item 1: the figures in the configs -----------------------------------------------------
def test_every_paper_config_has_a_paper_block_or_says_no_figure_was_found():
    """issue 41 item 1: each packaged paper config (``*-cifar100-*``, ``*-imagenet-subset``,
    ``active-cifar100``) loads with a ``paper:`` block, or has none and the comment line saying
    that no figure for its protocol was found (never both); the list is not empty."""
    names = [n for n in packaged_names() if is_paper_config(n)]
    assert len(names) >= 19
    with_figure = []
    for name in names:
        text = (CONFIGS / f"{name}.yaml").read_text()
        paper = load_config(name).paper
        said_none = any(line.startswith(NO_FIGURE) for line in text.splitlines())
        assert (paper is not None) != said_none, name
        if paper is not None:
            with_figure.append(name)
    assert {"podnet-cifar100-b50-5steps", "lucir-cifar100-b50-5steps", "icarl-cifar100-b0-10",
            "bic-imagenet-subset"} <= set(with_figure)


# the figures as the papers print them (transcribed here independently of the configs):
# (config, value, std, reading: metric, first state included, classifier, top)
PAPER_FIGURES = [
    ("podnet-cifar100-b50-5steps", 64.83, 0.98, ("average_incremental", True, "cnn", 1)),  # PODNet Table 1
    ("podnet-cifar100-b50-10steps", 63.19, 1.16, ("average_incremental", True, "cnn", 1)),
    ("podnet-cifar100-b50-25steps", 60.72, 1.36, ("average_incremental", True, "cnn", 1)),
    ("podnet-cifar100-b50-50steps", 57.98, 0.46, ("average_incremental", True, "cnn", 1)),
    ("lucir-cifar100-b50-5steps", 63.42, None, ("average_incremental", True, "cnn", 1)),  # LUCIR Fig. 5 legend
    ("lucir-cifar100-b50-10steps", 60.18, None, ("average_incremental", True, "cnn", 1)),
    ("icarl-cifar100-b0-10", 64.1, None, ("average_incremental", True, "nme", 1)),  # iCaRL Table 1(a)
    ("lwf-cifar100-b0-10", 44.4, None, ("average_incremental", True, "cnn", 1)),  # iCaRL Table 1(a), LwF.MC
    ("wa-cifar100-b0-10", 64.5, None, ("average_incremental", False, "cnn", 1)),  # WA Table 4, excl. the first
    ("bic-imagenet-subset", 84.40, None, ("last", True, "bic", 5)),  # BiC README "In paper", last state, top-5
]


@pytest.mark.parametrize("name,value,std,reading", PAPER_FIGURES, ids=[f[0] for f in PAPER_FIGURES])
def test_paper_figures_are_the_papers(name, value, std, reading):
    """issue 41 item 1: the figure of a few paper configs, its spread and how it reads (metric,
    first state, score set, top-k), against the paper's values typed in here; LUCIR's B50
    configs do not take LibContinual's 62.41 / 48.91 (another protocol)."""
    paper = load_config(name).paper
    assert paper is not None
    assert paper.summary() == pytest.approx(value, abs=1e-9)
    assert paper.std == std
    assert (paper.metric, paper.include_first, paper.classifier, paper.top) == reading
    assert paper.source and paper.title and paper.venue and paper.table
    if name.startswith("lucir"):
        assert paper.value not in (62.41, 48.91)
        assert all(r.value not in (62.41, 48.91) for r in paper.reproductions)


def test_bic_imagenet_lists_the_papers_top5_after_each_state():
    """issue 41 item 1: BiC's ImageNet-100 target is the per-state top-5 of the authors' README
    row "In paper", ten states ending at 84.4."""
    paper = load_config("bic-imagenet-subset").paper
    assert paper is not None
    assert paper.per_state == [98.40, 96.20, 94.00, 92.90, 91.10, 89.40, 88.10, 86.50, 85.40, 84.40]


# ----- item 2: the run's figure read the paper's way ------------------------------------------
def state(top1: float, top5: float, **variants: tuple[float, float]) -> dict[str, Any]:
    return {"top1": top1, "top5": top5, "variants": {k: {"top1": a, "top5": b} for k, (a, b) in variants.items()}}


ICARL = {"method": "icarl", "primary_scores": "nme",  # top1 is NME, variants.cnn the network's
         "states": [state(80.0, 95.0, cnn=(78.0, 94.0)), state(70.0, 90.0, cnn=(64.0, 88.0)),
                    state(60.0, 85.0, cnn=(53.0, 80.0))]}
PODNET = {"method": "podnet", "primary_scores": "cnn",  # top1 is CNN, variants.nme the NME
          "states": [state(75.0, 93.0, nme=(74.0, 92.0)), state(66.0, 89.0, nme=(67.0, 90.0))]}


def target(**kw: Any) -> PaperTarget:
    return PaperTarget(**{"title": "T", "venue": "V 2020", "table": "Table 1", "source": "S", "value": 50.0} | kw)


@pytest.mark.parametrize("results,reading,expected", [
    (ICARL, {"classifier": "nme"}, (80 + 70 + 60) / 3),  # the primary scores: top1
    (ICARL, {"classifier": "cnn"}, (78 + 64 + 53) / 3),  # a variant
    (ICARL, {"classifier": "nme", "include_first": False}, (70 + 60) / 2),
    (ICARL, {"classifier": "cnn", "metric": "last"}, 53.0),
    (ICARL, {"classifier": "nme", "top": 5}, (95 + 90 + 85) / 3),
    (ICARL, {"classifier": "cnn", "top": 5, "include_first": False}, (88 + 80) / 2),
    (PODNET, {"classifier": "cnn"}, (75 + 66) / 2),
    (PODNET, {"classifier": "nme"}, (74 + 67) / 2),
    (PODNET, {"classifier": "nme", "metric": "last", "top": 5}, 90.0),
], ids=["icarl-nme", "icarl-cnn-variant", "excl-first", "last", "top5", "variant-top5-excl", "podnet-cnn",
        "podnet-nme-variant", "last-top5-variant"])
def test_the_run_figure_is_read_the_papers_way(results, reading, expected):
    """issue 41 item 2: a run's figure read as the paper's: the primary top1 where the method's
    primary scores are the paper's classifier, else variants[classifier]; first state included
    or not; the last state; top-5 (values computed by hand from the hand-made results)."""
    assert run_figure(results, target(**reading)) == pytest.approx(expected)


def test_a_score_set_the_run_lacks_is_said():
    """issue 41 item 2: a paper read with NME beside a run without NME scores: no figure, and why."""
    t = target(classifier="nme")
    assert run_figure(ICARL | {"primary_scores": "cnn", "method": "x"}, t) is None
    assert "no 'nme' scores" in (why_no_figure(ICARL | {"primary_scores": "cnn", "method": "x"}, t) or "")


# ----- the verdict ----------------------------------------------------------------------------
def comparison(values: list[float], paper: float, changes: tuple[str, ...] | None = ()) -> PaperComparison:
    return PaperComparison("m", target(value=paper), tuple(range(len(values))), tuple(values), None, "c", changes)


def test_verdict_of_one_seed_and_of_three():
    """issue 41 item 2: one seed has no interval; three seeds 60, 62, 64: mean 62, sample std 2,
    95% interval 62 ± 4.303 * 2 / sqrt(3) = [57.03, 66.97]; a paper figure inside it is
    "within the seeds' 95% interval", one above it puts the runs "below", one under it "above"."""
    one = comparison([61.0], 64.83)
    assert one.verdict() == "one seed: no interval" and one.interval is None
    assert one.difference == pytest.approx(61.0 - 64.83)
    half = T_975_2 * 2.0 / math.sqrt(3)
    three = comparison([60.0, 62.0, 64.0], 64.83)
    low, high = three.interval or (0.0, 0.0)
    assert (low, high) == (pytest.approx(62 - half, abs=2e-3), pytest.approx(62 + half, abs=2e-3))
    assert three.std == pytest.approx(2.0)
    assert three.verdict() == "within the seeds' 95% interval"
    assert comparison([60.0, 62.0, 64.0], 62 + half + 0.05).verdict() == "below"
    assert comparison([60.0, 62.0, 64.0], 62 - half - 0.05).verdict() == "above"


# ----- still the paper's protocol? ------------------------------------------------------------
def run_dict(name: str, *overrides: str) -> dict[str, Any]:
    """A paper config as a run records it in config.yaml (one method, the name with the method)."""
    config = load_config(name, list(overrides))
    return config.for_method(str(config.method)).to_dict()


def test_a_changed_protocol_key_is_said():
    """issue 41 item 2: a run of a paper config that changed a protocol key (scenario.increment)
    or a method option (lucir.margin) is no longer the paper's protocol, and the line names the
    key with the paper's and the run's value; the data's path and how it ran (threads, device)
    do not count."""
    paper = load_config("lucir-cifar100-b50-5steps").to_dict()
    same = run_dict("lucir-cifar100-b50-5steps", "data.root=/somewhere", "threads=1", "device=cpu", "seed=7")
    assert protocol_changes(same, paper) == []
    changed = run_dict("lucir-cifar100-b50-5steps", "scenario.increment=5", "data.root=/somewhere")
    assert protocol_changes(changed, paper) == ["scenario.increment: 10 → 5"]
    line = comparison([60.0], 63.42, tuple(protocol_changes(changed, paper))).protocol_line()
    assert line == "no longer the paper's protocol (scenario.increment: 10 → 5)"
    option = run_dict("lucir-cifar100-b50-5steps", "lucir.margin=0.3")
    assert protocol_changes(option, paper) == ["lucir.margin: 0.5 → 0.3"]
    assert comparison([60.0], 63.42, ()).protocol_line() == "the paper's protocol (c)"


# ----- cilkit run and cilkit compare ----------------------------------------------------------
PAPER = {"title": "A Tiny Paper", "venue": "TOY 2024", "table": "Table 9", "metric": "average_incremental",
         "include_first": True, "classifier": "cnn", "top": 1, "value": 61.5, "std": 1.25, "paper_runs": 3,
         "source": "a test's own figure", "reproductions": [{"value": 60.25, "source": "a peer"}]}


@pytest.fixture(scope="module")
def printed_run(tmp_path_factory) -> tuple[Path, str]:
    """``cilkit run`` of a tiny config (2 states, 1 epoch, one thread) that carries a ``paper:``
    block; its directory and what it printed."""
    base = tmp_path_factory.mktemp("paper_targets")
    data = tiny_dict(base) | {"paper": PAPER, "threads": 1}
    data["scenario"]["states"] = 2
    data["train"]["epochs"] = 1
    (base / "tiny.yaml").write_text(yaml.safe_dump(data))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", str(base / "tiny.yaml"), "--out", str(base / "run")]) == 0
    return base / "run", out.getvalue()


def test_cilkit_run_prints_the_papers_figure_after_its_table(printed_run):
    """issue 41 item 2: ``cilkit run`` on a config with ``paper:`` prints, after its results
    table, the paper's figure beside the run's (its mean incremental top-1, first state
    included, computed here from results.json), the difference, "one seed: no interval", and
    that the protocol was not checked (no packaged config of the name)."""
    run, printed = printed_run
    results = json.loads((run / "results.json").read_text())
    mine = sum(s["top1"] for s in results["states"]) / len(results["states"])
    assert printed.index("| method |") < printed.index("Paper: A Tiny Paper (TOY 2024, Table 9)")
    row = next(line for line in printed.splitlines() if line.startswith("| finetune | 3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["finetune", "3", f"{mine:.2f}", "-", "61.5 ± 1.25 over 3 runs", f"{mine - 61.5:+.2f}",
                     "one seed: no interval"]
    assert "protocol not checked (no packaged config 'tiny')" in printed
    assert "Reproduced: 60.25 (a peer)" in printed


def seed_copy(run: Path, dest: Path, seed: int, top1: list[float], config: dict[str, Any]) -> Path:
    """A copy of ``run`` as the run of ``seed`` with the top-1 ``top1`` after each state."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "report"))
    res = json.loads((dest / "results.json").read_text())
    for s, v in zip(res["states"], top1):
        s["top1"] = v
    res["mean_incremental_top1"] = sum(top1) / len(top1)
    res["mean_incremental_top1_excl_first"] = sum(top1[1:]) / len(top1[1:])
    (dest / "results.json").write_text(json.dumps(res))
    (dest / "config.yaml").write_text(yaml.safe_dump(config | {"seed": seed}))
    return dest


def test_compare_writes_the_paper_line_into_table_md_tex_and_html(printed_run, tmp_path):
    """issue 41 item 2: ``cilkit compare`` of three seeds (mean incremental top-1 60, 62, 64 over
    two states: per state 65/55, 66/58, 70/58) of a config carrying a paper figure of 61.5:
    table.md has the paper line and the row (62.00 ± 2.00, interval 62 ± 4.303 * 2 / sqrt(3),
    difference +0.50, within), table.tex's caption the paper sentence, report.html a Paper
    section; named as a packaged paper config with another method, the runs are no longer the
    paper's protocol; runs without ``paper:`` get none of it."""
    run, _ = printed_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    dirs = [seed_copy(run, tmp_path / f"s{k}", k, top1, config)
            for k, top1 in enumerate([[65.0, 55.0], [66.0, 58.0], [70.0, 58.0]])]
    out = compare_runs(dirs, tmp_path / "cmp", echo=False)
    md = (out / "table.md").read_text()
    half = T_975_2 * 2.0 / math.sqrt(3)
    assert "Paper: A Tiny Paper (TOY 2024, Table 9), average incremental top-1 (CNN, first state included): " \
           "61.5 ± 1.25 over 3 runs." in md
    row = next(line for line in md.splitlines() if line.startswith("| finetune | 0, 1, 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "62.00 ± 2.00" and cells[5] == "+0.50" and cells[6] == "within the seeds' 95% interval"
    low, high = (float(x) for x in cells[3].strip("[]").split(", "))
    assert low == pytest.approx(62 - half, abs=0.006) and high == pytest.approx(62 + half, abs=0.006)
    tex = (out / "table.tex").read_text()
    caption = next(line for line in tex.splitlines() if line.startswith(r"\caption{"))
    assert "Paper: A Tiny Paper (TOY 2024, Table 9)" in caption and "within the seeds' 95\\% interval" in caption
    assert "<h2>Paper</h2>" in (out / "report.html").read_text()

    renamed = copy.deepcopy(config) | {"name": "icarl-cifar100-b0-10/finetune"}
    other = [seed_copy(run, tmp_path / f"r{k}", k, [60.0, 50.0], renamed) for k in range(2)]
    md = (compare_runs(other, tmp_path / "cmp2", echo=False) / "table.md").read_text()
    assert "no longer the paper's protocol (method: icarl → finetune)" in md

    plain = {k: v for k, v in config.items() if k != "paper"}
    bare = [seed_copy(run, tmp_path / f"b{k}", k, [60.0, 50.0], plain) for k in range(2)]
    out = compare_runs(bare, tmp_path / "cmp3", echo=False)
    assert "Paper" not in (out / "table.md").read_text() and "Paper:" not in (out / "table.tex").read_text()
    assert "<h2>Paper</h2>" not in (out / "report.html").read_text()
