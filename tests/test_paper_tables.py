"""The LaTeX table of a report (table.tex) and where ``cilkit compare`` writes without --out."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import one_error_line, snapshot, tiny_config
from scipy import stats

from cilkit.analysis.report import COMPARE_MARKER, compare_runs, default_out, describe_protocol
from cilkit.analysis.latex import COLUMN_KEYS, latex_escape, table_latex
from cilkit.analysis.runsets import find_runs, group_runs
from cilkit.analysis.paired import paired_rows
from cilkit.analysis.tables import build_table
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
    found = re.findall(r"\\begin\{tabular\}\{((?:@\{\}|[^}])*)\}(.*?)\\end\{tabular\}", code, re.S)
    out = []
    for spec, body in found:
        spec = spec.replace("@{}", "")
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
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{table}", r"\caption{"):
        assert tex.count(rule) == tex.count(r"\begin{tabular}")
    found = tabulars(tex)
    for spec, rows in found:
        assert re.fullmatch(r"[lrc]+", spec)
        assert all(len(row) == len(spec) for row in rows), (spec, rows)
    return found


def captions(tex: str) -> list[str]:
    return re.findall(r"\\caption\{(.*)\}$", tex, re.M)


def mean_of(cell: str) -> float | None:
    """The mean a cell shows (``75.47\\,{\\scriptsize$\\pm$2.70}``, ``75.47``, bold or not); None for ``--``."""
    m = re.match(r"(?:\\textbf\{)?(-?\d+\.\d+)", cell)
    return float(m.group(1)) if m else None


def compile_log(tex_file: Path, tmp_path: Path) -> str:
    """pdflatex's log of an article (default text width, 345pt) that inputs ``tex_file``."""
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                   f"\\input{{{tex_file}}}\n\\end{{document}}\n")
    subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                   check=True, capture_output=True, timeout=120)
    assert (tmp_path / "doc.pdf").read_bytes().startswith(b"%PDF")
    return (tmp_path / "doc.log").read_text(errors="replace")


def column_values(results: dict[str, Any]) -> dict[str, float]:
    """The figures of a run by table heading, read from its results.json."""
    values = {f"{c} cl.": s["top1"] for c, s in zip(results["state_ends"], results["states"])}
    values.update({"mean inc.": results["mean_incremental_top1"], "last": results["states"][-1]["top1"],
                   "mean inc. (excl. 1st)": results["mean_incremental_top1_excl_first"],
                   "last old": results["states"][-1]["top1_old"], "last new": results["states"][-1]["top1_new"],
                   "forgetting": results["average_forgetting"], "time (s)": results["wall_time_s"]})
    return values


# ----- table.tex -------------------------------------------------------------------------------
@pytest.mark.slow
def test_table_tex_of_two_single_runs(finished, tmp_path):
    """The default columns (mean inc., last, balanced, forgetting) with the runs' numbers; one
    seed per row: no paired comparison, so no bold; a caption naming the protocol and the seed."""
    a = make_run(finished, tmp_path / "a")
    b = make_run(finished, tmp_path / "b", OTHER, shift=3.0)
    out = compare_runs([a, b], tmp_path / "cmp", echo=False)
    tex = (out / "table.tex").read_text()
    [(spec, rows)] = check_structure(tex)
    heads, body = rows[0], rows[1:]
    assert heads == ["method", "mean inc.", "last", "bal. mean inc.", "forgetting"] and spec == "lrrrr"
    assert [r[0] for r in body] == ["finetune", r"my\_method"] and "my_method" not in tex
    assert r"\pm" not in tex.split(r"\caption")[0]  # one seed each: no std
    results = [json.loads((d / "results.json").read_text()) for d in (a, b)]
    for row, r in zip(body, results):
        for title in ("mean inc.", "last", "forgetting"):
            digits = 2 if title == "mean inc." else 1
            assert row[heads.index(title)] == f"{column_values(r)[title]:.{digits}f}"
        bal = [s["balanced_top1"] for s in r["states"]]
        assert row[heads.index("bal. mean inc.")] == f"{sum(bal) / len(bal):.2f}"
    assert not any(bold(cell) for row in body for cell in row)  # b is 3 points higher, on one seed
    [caption] = captions(tex)
    assert "Dataset: digits." in caption and "seed 3" in caption and "No bold: one seed per row" in caption
    assert "time (s)" not in tex and r"\label{tab:cilkit}" in tex
    # the same numbers as table.md, once
    md = (out / "table.md").read_text()
    assert f"| {OTHER} | " in md and f"{column_values(results[1])['mean inc.']:.2f}" in md


@pytest.mark.slow
def test_table_tex_of_repeated_runs_has_std_and_the_verdict(finished, tmp_path):
    dirs = [make_run(finished, tmp_path / f"ft{s}", seed=s, shift=s * 0.1) for s in (3, 4)]
    dirs += [make_run(finished, tmp_path / f"my{s}", OTHER, shift=5.0 + s * 0.3, seed=s) for s in (3, 4)]
    out = compare_runs(dirs, tmp_path / "cmp", echo=False, baseline="finetune")
    tex = (out / "table.tex").read_text()
    [(spec, rows)] = check_structure(tex)
    heads, body = rows[0], rows[1:]
    assert heads[0] == "method" and heads[-1] == "vs. finetune" and "seeds" not in heads
    assert [r[0] for r in body] == ["finetune", r"my\_method"]
    col = heads.index("mean inc.")
    cells = [bold(row[col]) or row[col] for row in body]
    assert all(re.fullmatch(r"\d+\.\d\d\\,\{\\scriptsize\$\\pm\$\d+\.\d\d\}", c) for c in cells), cells
    # my_method minus finetune: 5.6 and 5.8 on seeds 3 and 4, a 95% interval of 5.7 ± 12.71 * 0.1
    assert bold(body[1][col]) is not None and bold(body[0][col]) is None
    assert body[0][-1] == "baseline"
    assert body[1][-1] == "$+$5.70 better", body[1][-1]
    [caption] = captions(tex)
    assert "seeds 3, 4" in caption and r"mean $\pm$ std over the seeds" in caption


def scored_run(finished: Path, dest: Path, method: str, seed: int, top1: list[float], balanced: list[float],
               forgetting: float, variants: dict[str, list[float]] | None = None) -> Path:
    """A copy of ``finished`` (2 states) as a run of ``method`` and ``seed`` with these per-state
    top-1 and balanced top-1 (and their means), ``forgetting``, and ``variants``: a score set's
    per-state top-1 (its balanced top-1 30 points lower)."""
    shutil.copytree(finished, dest, ignore=shutil.ignore_patterns("checkpoints", "report", "calibrated"))
    res = json.loads((dest / "results.json").read_text())
    res["method"] = method
    for b, state in enumerate(res["states"]):
        state.update(top1=top1[b], balanced_top1=balanced[b])
        state["variants"] = {v: {"top1": t[b], "balanced_top1": t[b] - 30, "top1_old": t[b] - 5, "top1_new": t[b] + 5}
                             for v, t in (variants or {}).items()}
    res.update(mean_incremental_top1=sum(top1) / len(top1), mean_incremental_top1_excl_first=sum(top1[1:]) / (len(top1) - 1),
               average_forgetting=forgetting)
    (dest / "results.json").write_text(json.dumps(res))
    config = yaml.safe_load((dest / "config.yaml").read_text())
    config.update(method=method, seed=seed)
    (dest / "config.yaml").write_text(yaml.safe_dump(config))
    return dest


def tex_of(runs: list[Path], baseline: str | None = None, **kw: Any) -> str:
    """table.tex of ``runs`` as ``compare_runs`` writes it, without drawing the figures."""
    protocols = group_runs(find_runs(runs))
    paired = paired_rows(protocols, baseline) if baseline is not None else None
    return table_latex([build_table(p.groups) for p in protocols], paired, baseline,
                       descriptions=[describe_protocol(p) for p in protocols], **kw)


SEEDS = (0, 1, 2)
NOISE = (9.0, -6.0, 9.5)  # bic's last-state top-1 minus fine-tuning's, per seed: a high mean, no consistency


def bold_scenario(s: int) -> dict[str, dict[str, Any]]:
    """Per method, seed ``s``'s top-1 and balanced top-1 per state, forgetting and variants: il2m
    equals finetune (a tie); lucir is consistently above both, and above bic on mean inc.; bic
    has the best mean of the non-reference rows on the last state, but only on average; joint
    (the reference) is above everything."""
    ft = [80.0 + s, 60.0 + 0.5 * s]
    bal = [x - 1 for x in ft]
    lucir = [85.0 + 1.1 * s, 64.0 + 0.6 * s]
    return {
        "finetune": dict(top1=ft, balanced=bal, forgetting=20.0 + s),
        "il2m": dict(top1=ft, balanced=bal, forgetting=20.0 + s),
        "lucir": dict(top1=lucir, balanced=bal, forgetting=15.0 + s, variants={"nme": [x - 1 for x in lucir]}),
        "bic": dict(top1=[ft[0] - 4 - NOISE[s], ft[1] + NOISE[s]], balanced=[x - 2 for x in bal], forgetting=17.0 + s),
        "joint": dict(top1=[95.0 + s, 90.0 + s], balanced=[95.0 + s, 90.0 + s], forgetting=1.0),
    }


def expected_bold(per_row: dict[str, dict[int, float]], higher: bool) -> str | None:
    """The row a paired t interval (scipy) over the shared seeds puts above every other one."""
    for a, va in per_row.items():
        ok = True
        for b, vb in per_row.items():
            if a == b:
                continue
            d = [va[s] - vb[s] for s in SEEDS]
            mean, sd = sum(d) / len(d), statistics.stdev(d)
            half = stats.t.ppf(0.975, len(d) - 1) * sd / len(d) ** 0.5
            ok &= (mean - half > 0) if higher else (mean + half < 0)
        if ok:
            return a
    return None


def test_bold_is_where_the_paired_comparison_distinguishes_a_row_never_joint(finished, tmp_path):
    runs = []
    for s in SEEDS:
        for method, spec in bold_scenario(s).items():
            runs.append(scored_run(finished, tmp_path / f"{method}-{s}", method, s, **spec))
    tex = tex_of(runs)
    [(spec, rows)] = check_structure(tex)
    heads, body = rows[0], {r[0]: r[1:] for r in rows[1:]}
    assert list(body) == ["finetune", "il2m", "lucir", "lucir [nme]", "bic", "joint"]
    bolded = {h: [label for label, cells in body.items() if bold(cells[j - 1])] for j, h in enumerate(heads) if j}
    # expected independently: each row's per-seed figure, a paired t interval against every other row but joint
    figures = {"mean inc.": lambda t, b, f: sum(t) / 2, "last": lambda t, b, f: t[-1],
               "bal. mean inc.": lambda t, b, f: sum(b) / 2, "forgetting": lambda t, b, f: f}
    for title, figure in figures.items():
        per_row: dict[str, dict[int, float]] = {}
        for s in SEEDS:
            for method, x in bold_scenario(s).items():
                if method == "joint":
                    continue
                per_row.setdefault(method, {})[s] = figure(x["top1"], x["balanced"], x["forgetting"])
                for v, t in x.get("variants", {}).items():
                    if title != "forgetting":  # a score set has no forgetting
                        per_row.setdefault(f"{method} [{v}]", {})[s] = figure(t, [x - 30 for x in t], None)
        want = expected_bold(per_row, higher=title != "forgetting")
        assert bolded[title] == ([want] if want else []), (title, bolded[title])
    assert bolded == {"mean inc.": ["lucir"], "last": [], "bal. mean inc.": [], "forgetting": ["lucir"]}
    # what the old rule (the best mean per column) would have bolded: bic's noisy last, the tied
    # finetune and il2m on balanced top-1, and joint everywhere
    last = heads.index("last")
    best = max((mean_of(c[last - 1]), m) for m, c in body.items() if m != "joint")
    assert best[1] == "bic" and mean_of(body["joint"][last - 1]) > best[0]
    [caption] = captions(tex)
    assert "Reference (upper bound), never bold: joint." in caption and "seeds 0, 1, 2" in caption
    assert "puts above every other row" in caption
    # without the variant rows: lucir [nme] gone, the bold the same
    again = tex_of(runs, variants=False)
    [(_, rows)] = check_structure(again)
    assert [r[0] for r in rows[1:]] == ["finetune", "il2m", "lucir", "bic", "joint"]
    assert [r[0] for r in rows[1:] if any(bold(c) for c in r)] == ["lucir"]
    assert "Rows method [x]" not in captions(again)[0]


def test_only_joint_is_a_reference_method():
    from cilkit.settings.registry import METHODS
    from cilkit.training.protocol import Method

    assert Method.reference is False
    assert [name for name, cls in METHODS.items() if cls.reference] == ["joint"]


METHODS_MANY = {"finetune": {}, "icarl": {"cnn": -4.0}, "lucir": {"nme": -1.5}, "bic": {"uncorrected": -7.0},
                "il2m": {"cnn": -2.0}, "podnet": {"nme": -1.0}, "sir": {}, "wa": {}, "eeil": {}, "ssil": {},
                "gdumb": {}, "scail": {"cnn": -2.0}, "joint": {}}


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_the_default_table_of_many_methods_fits_the_page(finished, tmp_path):
    """13 methods, 6 with a variant row, 3 seeds, a baseline: the default table.tex compiles in an
    article (345pt text width) without an overfull box; every column (the old table) does not."""
    runs = []
    for k, (method, variants) in enumerate(METHODS_MANY.items()):
        for s in SEEDS:
            top1 = [70.0 + k + 1.37 * s, 60.0 + 0.7 * k - 0.91 * s]
            runs.append(scored_run(finished, tmp_path / f"{method}-{s}", method, s, top1, [t - 3.3 for t in top1],
                                   10.0 + k / 3 + s, {v: [t + d for t in top1] for v, d in variants.items()}))
    (tmp_path / "table.tex").write_text(tex := tex_of(runs, "finetune"))
    [(spec, rows)] = check_structure(tex)
    assert len(rows) == 1 + len(METHODS_MANY) + sum(map(len, METHODS_MANY.values())) and rows[0][-1] == "vs. finetune"
    log = compile_log(tmp_path / "table.tex", tmp_path)
    assert "Overfull \\hbox" not in log, [ln for ln in log.splitlines() if "Overfull" in ln]
    # the check reads what it should: the table with every column is too wide
    (tmp_path / "all.tex").write_text(tex_of(runs, "finetune", columns=list(COLUMN_KEYS)))
    assert "Overfull \\hbox" in compile_log(tmp_path / "all.tex", tmp_path)


def test_compare_columns_and_no_variants_shape_table_tex_alone(finished, tmp_path, capsys):
    dirs = [scored_run(finished, tmp_path / f"{m}-{s}", m, s, [80.0 + s + k, 70.0 - s + k], [79.0, 69.0 + k],
                       10.0 + s, {"cnn": [75.0 + s, 60.0]} if m == "icarl" else None)
            for k, m in enumerate(("finetune", "icarl")) for s in (3, 4)]
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, dirs), "--out", str(out), "--columns", "states,last,time,seeds",
                 "--no-variants"]) == 0
    capsys.readouterr()
    tex = (out / "table.tex").read_text()
    [(spec, rows)] = check_structure(tex)
    ends = json.loads((dirs[0] / "results.json").read_text())["state_ends"]
    assert rows[0] == ["method", f"{ends[0]} cl.", f"{ends[1]} cl.", "time (s)", "seeds"]  # last: the last state, once
    assert [r[0] for r in rows[1:]] == ["finetune", "icarl"] and spec == "lrrrl"
    assert [r[-1] for r in rows[1:]] == ["3, 4", "3, 4"]
    assert mean_of(rows[1][1]) == pytest.approx(statistics.mean([80.0 + 3, 80.0 + 4]), abs=0.05)
    md = (out / "table.md").read_text()  # the full record: every column and row
    assert "| icarl [cnn] |" in md and "time (s)" in md and "mean inc. (excl. 1st)" in md
    [(_, rows)] = check_structure(tex_of(dirs, columns="last, forgetting".split(",")))
    assert rows[0] == ["method", "last", "forgetting"] and [r[0] for r in rows[1:]] == ["finetune", "icarl",
                                                                                        "icarl [cnn]"]


def test_an_unknown_column_is_one_line_naming_the_known_ones(finished, tmp_path, capsys):
    a = make_run(finished, tmp_path / "a")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), "--out", str(out), "--columns", "mean_inc,forgeting"]) == 2
    line = one_error_line(capsys)
    assert "'forgeting'" in line and "did you mean 'forgetting'?" in line
    assert all(name in line for name in COLUMN_KEYS)
    assert not out.exists()
    assert main(["compare", str(a), "--out", str(out), "--columns", ","]) == 2
    assert "--columns names no column" in one_error_line(capsys) and not out.exists()


def test_latex_escape_handles_the_special_characters():
    assert latex_escape("a_b%c&d#e") == r"a\_b\%c\&d\#e"
    assert latex_escape("x{y}$") == r"x\{y\}\$"
    assert latex_escape("[cnn]").startswith("{}[")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
@pytest.mark.slow
def test_table_tex_compiles(finished, tmp_path):
    """Two methods of two seeds each (mean $\\pm$ std cells, bold best, the verdict column)."""
    runs = [make_run(finished, tmp_path / f"{m}-{s}", m, shift=3.0 * (m == OTHER) + s, seed=s)
            for m in ("finetune", OTHER) for s in (3, 4)]
    compare_runs(runs, tmp_path / "cmp", echo=False, baseline="finetune")
    assert r"\pm" in (tmp_path / "cmp" / "table.tex").read_text()
    assert "Overfull" not in compile_log(tmp_path / "cmp" / "table.tex", tmp_path)


# ----- where compare writes --------------------------------------------------------------------
@pytest.mark.slow
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
    text = describe_protocol(SimpleNamespace(results=results, groups=[], config=None, regimes=()))
    assert "Imbalance: longtail, ratio 10.0; 500 to 50 training images per class; applied to the test set too." in text
    balanced_test = describe_protocol(SimpleNamespace(results=results | {"imbalance": record | {"apply_to_test": False}},
                                                      groups=[], config=None, regimes=()))
    assert "the test set balanced" in balanced_test
    none = describe_protocol(SimpleNamespace(results=results | {"imbalance": {"profile": "none"}}, groups=[], config=None, regimes=()))
    assert "Imbalance" not in none
