"""The LaTeX table of a report (table.tex) and where ``cilkit compare`` writes without --out."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import one_error_line, snapshot, tiny_config

from cilkit.analysis.report import COMPARE_MARKER, compare_runs, default_out
from cilkit.analysis.latex import latex_escape
from cilkit.cli import main
from cilkit.run.loop import Run

OTHER = "my_method"  # an underscore: escaped in the table


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-state finetune run (1 epoch, one thread)."""
    base = tmp_path_factory.mktemp("paper")
    Run(tiny_config(base, "train.epochs=1", "threads=1", "scenario.states=2"), base / "run", progress=False).execute()
    return base / "run"


def make_run(finished: Path, dest: Path, method: str = "finetune", shift: float = 0.0, seed: int = 3) -> Path:
    """A copy of ``finished`` as a run of ``method`` and ``seed``, its figures moved by ``shift``."""
    shutil.copytree(finished, dest, ignore=shutil.ignore_patterns("checkpoints", "report", "calibrated"))
    res = json.loads((dest / "results.json").read_text())
    res["method"] = method
    res["states"] = [{**s, "top1": s["top1"] + shift, "top1_old": None if s["top1_old"] is None else s["top1_old"] + shift} for s in res["states"]]
    for key in ("mean_incremental_top1", "mean_incremental_top1_excl_first"):
        res[key] += shift
    res["average_forgetting"] -= shift / 2
    (dest / "results.json").write_text(json.dumps(res))
    config = yaml.safe_load((dest / "config.yaml").read_text())
    config.update(method=method, seed=seed)
    (dest / "config.yaml").write_text(yaml.safe_dump(config))
    return dest


# ----- a parser of the .tex ------------------------------------------------------------------
def tabulars(tex: str) -> list[tuple[str, list[list[str]]]]:
    """Each ``tabular`` of ``tex``: its column spec and its rows (cells, the heading row first)."""
    code = "\n".join(line for line in tex.splitlines() if not line.lstrip().startswith("%"))
    found = re.findall(r"\\begin\{tabular\}\{([^}]*)\}(.*?)\\end\{tabular\}", code, re.S)
    out = []
    for spec, body in found:
        lines = [ln.strip() for ln in body.strip().splitlines()]
        rows = [re.split(r"(?<!\\)&", ln.removesuffix(r"\\")) for ln in lines if ln.endswith(r"\\")]
        out.append((spec, [[c.strip() for c in row] for row in rows]))
    return out


def balanced(tex: str) -> bool:
    depth = 0
    for m in re.finditer(r"(?<!\\)[{}]", tex):
        depth += 1 if m.group() == "{" else -1
        if depth < 0:
            return False
    return depth == 0


def bold(cell: str) -> str | None:
    m = re.fullmatch(r"\\textbf\{(.*)\}", cell)
    return m.group(1) if m else None


def check_structure(tex: str) -> list[tuple[str, list[list[str]]]]:
    assert tex.startswith("%") and r"\usepackage{booktabs}" in tex.splitlines()[0]
    assert balanced(tex)
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") >= 1
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == tex.count(r"\begin{tabular}")
    found = tabulars(tex)
    for spec, rows in found:
        assert re.fullmatch(r"[lrc]+", spec)
        assert all(len(row) == len(spec) for row in rows), (spec, rows)
    return found


def column_values(results: dict[str, Any]) -> dict[str, float]:
    """The figures of a run by table heading, read from its results.json."""
    values = {f"{c} cl.": s["top1"] for c, s in zip(results["state_ends"], results["states"])}
    values.update({"mean inc.": results["mean_incremental_top1"],
                   "mean inc. (excl. 1st)": results["mean_incremental_top1_excl_first"],
                   "last old": results["states"][-1]["top1_old"], "last new": results["states"][-1]["top1_new"],
                   "forgetting": results["average_forgetting"], "time (s)": results["wall_time_s"]})
    return values


# ----- table.tex -------------------------------------------------------------------------------
def test_table_tex_of_two_single_runs(finished, tmp_path):
    a = make_run(finished, tmp_path / "a")
    b = make_run(finished, tmp_path / "b", OTHER, shift=3.0)
    out = compare_runs([a, b], tmp_path / "cmp", echo=False)
    tex = (out / "table.tex").read_text()
    [(spec, rows)] = check_structure(tex)
    heads, body = rows[0], rows[1:]
    assert heads[0] == "method" and len(body) == 2
    assert [r[0] for r in body] == ["finetune", r"my\_method"] and "my_method" not in tex
    assert r"\pm" not in tex  # one seed each: no std
    results = [json.loads((d / "results.json").read_text()) for d in (a, b)]
    for title, digits, pick in [("mean inc.", 2, max), ("mean inc. (excl. 1st)", 2, max), ("last old", 1, max),
                                (f"{results[0]['state_ends'][-1]} cl.", 1, max), ("forgetting", 1, min)]:
        col = heads.index(latex_escape(title))
        best = pick(column_values(r)[title] for r in results)
        bolded = [bold(row[col]) for row in body if bold(row[col]) is not None]
        assert bolded == [f"{best:.{digits}f}"], (title, [row[col] for row in body])
    time_col = heads.index(latex_escape("time (s)"))
    assert all(bold(row[time_col]) is None for row in body)
    # the same numbers as table.md, once
    md = (out / "table.md").read_text()
    assert f"| {OTHER} | " in md and f"{column_values(results[1])['mean inc.']:.2f}" in md


def test_table_tex_of_repeated_runs_has_std_and_the_verdict(finished, tmp_path):
    dirs = [make_run(finished, tmp_path / f"ft{s}", seed=s, shift=s * 0.1) for s in (3, 4)]
    dirs += [make_run(finished, tmp_path / f"my{s}", OTHER, shift=5.0 + s * 0.3, seed=s) for s in (3, 4)]
    out = compare_runs(dirs, tmp_path / "cmp", echo=False, baseline="finetune")
    tex = (out / "table.tex").read_text()
    [(spec, rows)] = check_structure(tex)
    heads, body = rows[0], rows[1:]
    assert heads[:3] == ["method", "runs", "seeds"] and heads[-1] == "vs. finetune"
    assert [r[0] for r in body] == ["finetune", r"my\_method"]
    assert r"$\pm$" in tex
    col = heads.index("mean inc.")
    cells = [bold(row[col]) or row[col] for row in body]
    assert all(re.fullmatch(r"\d+\.\d\d \$\\pm\$ \d+\.\d\d", c) for c in cells), cells
    assert bold(body[1][col]) is not None and bold(body[0][col]) is None  # my_method is higher
    assert body[0][-1] == "baseline"
    assert re.fullmatch(r"(better|worse|not distinguishable|n/a .*) \([+-]\d+\.\d\d\)", body[1][-1]), body[1][-1]


def test_latex_escape_handles_the_special_characters():
    assert latex_escape("a_b%c&d#e") == r"a\_b\%c\&d\#e"
    assert latex_escape("x{y}$") == r"x\{y\}\$"
    assert latex_escape("[cnn]").startswith("{}[")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_table_tex_compiles(finished, tmp_path):
    """Two methods of two seeds each (mean $\\pm$ std cells, bold best, the verdict column)."""
    runs = [make_run(finished, tmp_path / f"{m}-{s}", m, shift=3.0 * (m == OTHER) + s, seed=s)
            for m in ("finetune", OTHER) for s in (3, 4)]
    compare_runs(runs, tmp_path / "cmp", echo=False, baseline="finetune")
    assert r"\pm" in (tmp_path / "cmp" / "table.tex").read_text()
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                   f"\\input{{{tmp_path / 'cmp' / 'table.tex'}}}\n\\end{{document}}\n")
    subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                   check=True, capture_output=True, timeout=120)
    assert (tmp_path / "doc.pdf").read_bytes().startswith(b"%PDF")


# ----- where compare writes --------------------------------------------------------------------
def test_compare_without_out_writes_a_new_directory(finished, tmp_path, monkeypatch, capsys):
    a = make_run(finished, tmp_path / "a")
    b = make_run(finished, tmp_path / "b", OTHER, shift=3.0)
    compare_runs([a], echo=False)  # A's own report
    before = {d: snapshot(d) for d in (a, b)}
    assert (a / "report" / "table.tex").is_file()
    monkeypatch.chdir(tmp_path)
    for expected in ("compare-a-b", "compare-a-b-2"):  # a second compare: another new directory
        assert main(["compare", str(a), str(b)]) == 0
        new = tmp_path / "runs" / expected
        assert f"report: {Path('runs') / expected / 'report.html'}" in capsys.readouterr().out
        assert {"table.md", "table.csv", "table.tex", "report.html", COMPARE_MARKER} <= {p.name for p in new.iterdir()}
        assert {d: snapshot(d) for d in (a, b)} == before  # A's report and B untouched
    assert default_out([a, b, a]) == Path("runs") / "compare-a-b-and-1-more"


def test_compare_out_refuses_an_existing_directory_that_is_not_a_compare_output(finished, tmp_path, capsys):
    a = make_run(finished, tmp_path / "a")
    b = make_run(finished, tmp_path / "b", OTHER, shift=3.0)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "paper.tex").write_text("my paper\n")
    assert main(["compare", str(a), str(b), "--out", str(mine)]) == 2
    line = one_error_line(capsys)
    assert f"'{mine}'" in line and "not a cilkit compare output" in line
    assert [p.name for p in mine.iterdir()] == ["paper.tex"]


def test_the_protocol_header_names_the_imbalance_profile():
    """Issue 26 item 1: kind, ratio, images per class and whether the test set has it."""
    from types import SimpleNamespace

    from cilkit.analysis.report import describe_protocol

    record = {"profile": "longtail", "ratio": 10.0, "apply_to_test": True,
              "train_per_class": [500, 300, 120, 50], "test_per_class": [100, 60, 24, 10]}
    results = {"dataset": "imagefolder", "num_states": 2, "state_ends": [2, 4], "imbalance": record}
    text = describe_protocol(SimpleNamespace(results=results, groups=[], config=None))
    assert "Imbalance: longtail, ratio 10.0; 500 to 50 training images per class; applied to the test set too." in text
    balanced_test = describe_protocol(SimpleNamespace(results=results | {"imbalance": record | {"apply_to_test": False}},
                                                      groups=[], config=None))
    assert "the test set balanced" in balanced_test
    none = describe_protocol(SimpleNamespace(results=results | {"imbalance": {"profile": "none"}}, groups=[], config=None))
    assert "Imbalance" not in none
