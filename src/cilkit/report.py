"""Comparison of runs: one table (Markdown, CSV, HTML), the figures of ``cilkit.plots``, and a
self-contained ``report.html``.

The table has one row per method: top-1 after each state, mean incremental top-1 with and
without state 0 (LUCIR includes it; IL2M and active IL exclude it), top-1 on the old and on the
new classes after the last state, average forgetting (Chaudhry et al., 2018), wall time. Extra
score sets of a run (iCaRL's ``cnn`` beside its NME, ...) get their own row, ``icarl [cnn]``;
forgetting and time are not defined for them. Its columns are defined once
(:func:`table_columns`, :func:`table_rows`) and written three ways.
"""

from __future__ import annotations

import base64
import csv
import html
import io as _text_io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cilkit import io
from cilkit.errors import UserError
from cilkit.metrics import Results, fmt, mean_incremental, variant_names
from cilkit.plots import figures as make_figures
from cilkit.rundir import RunLayout, read_results



# ----- the table -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    title: str  # Markdown / HTML heading
    key: str  # CSV heading
    digits: int  # decimals shown in Markdown / HTML (the CSV keeps full precision)


def _state_count(results: Results) -> int:
    return max((len(r["states"]) for r in results.values()), default=0)


def _state_titles(results: Results, n: int) -> list[str]:
    """``"4 cl."`` (classes seen) when every run shares the protocol, else ``"state 1"``."""
    ends = {tuple(r["state_ends"][:n]) for r in results.values()}
    if len(ends) == 1:
        return [f"{c} cl." for c in next(iter(ends))]
    return [f"state {b + 1}" for b in range(n)]


def table_columns(results: Results) -> list[Column]:
    """The table's columns: method, top-1 after each state, then the summaries."""
    n = _state_count(results)
    return [
        Column("method", "method", 0),
        *[Column(t, f"top1_state{b + 1}", 1) for b, t in enumerate(_state_titles(results, n))],
        Column("mean inc.", "mean_incremental_top1", 2),
        Column("mean inc. (excl. 1st)", "mean_incremental_top1_excl_first", 2),
        Column("last old", "last_top1_old", 1),
        Column("last new", "last_top1_new", 1),
        Column("forgetting", "average_forgetting", 1),
        Column("time (s)", "wall_time_s", 1),
    ]


def _padded(values: list[float | None], n: int) -> list[float | None]:
    return values + [None] * (n - len(values))


def _variant_row(label: str, variant: str, r: Mapping[str, Any], n: int) -> list[Any]:
    accs = [s.get("variants", {}).get(variant, {}) for s in r["states"]]
    tops = [a.get("top1") for a in accs]
    known = [t for t in tops if t is not None]
    complete = len(known) == len(tops)
    return [
        f"{label} [{variant}]", *_padded(tops, n),
        mean_incremental(known) if complete else None,
        mean_incremental(known, skip_first=True) if complete else None,
        accs[-1].get("top1_old"), accs[-1].get("top1_new"), None, None,
    ]


def table_rows(results: Results) -> list[list[Any]]:
    """The table's values (label, then floats or None), one row per method and score set."""
    n = _state_count(results)
    rows = []
    for label, r in results.items():
        last = r["states"][-1] if r["states"] else {}
        rows.append([
            label, *_padded([s["top1"] for s in r["states"]], n),
            r.get("mean_incremental_top1"), r.get("mean_incremental_top1_excl_first"),
            last.get("top1_old"), last.get("top1_new"),
            r.get("average_forgetting"), r.get("wall_time_s"),
        ])
        rows += [_variant_row(label, v, r, n) for v in variant_names(r)] if r["states"] else []
    return rows


def _formatted(results: Results) -> tuple[list[Column], list[list[str]]]:
    cols = table_columns(results)
    return cols, [[fmt(v, c.digits) for v, c in zip(row, cols)] for row in table_rows(results)]


def state_table(results: Results) -> str:
    """A Markdown table: one row per method (and extra score set), top-1 after each state, then
    the summaries."""
    if not results:
        return ""
    cols, rows = _formatted(results)
    lines = ["| " + " | ".join(c.title for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def table_csv(results: Results) -> str:
    """The same table as CSV, full precision, empty cells for undefined values."""
    buf = _text_io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(c.key for c in table_columns(results))
    w.writerows([("" if v is None else v) for v in row] for row in table_rows(results))
    return buf.getvalue()


def table_html(results: Results) -> str:
    """The same table as an HTML ``<table>`` (numbers right-aligned)."""
    cols, rows = _formatted(results)
    head = "".join(f"<th>{html.escape(c.title)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td{'' if i == 0 else ' class=num'}>{html.escape(v)}</td>" for i, v in enumerate(row))
        + "</tr>\n"
        for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


# ----- finding the runs ------------------------------------------------------------------------
@dataclass(frozen=True)
class FoundRun:
    """A run found by :func:`find_runs`: its label in tables, directory and results."""

    label: str
    path: Path
    results: dict[str, Any]


def _listed_methods(parent: Path) -> list[str]:
    """The methods a comparison's config.yaml lists (``method: [a, b]``), in its order."""
    try:
        method = (yaml.safe_load(RunLayout(parent).config.read_text()) or {}).get("method")
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return [str(m) for m in method] if isinstance(method, list) else []


def _method_dirs(parent: Path) -> list[Path]:
    """The run directories under a comparison's parent: its config's methods first (each must
    have results.json), then any other sub-directory holding one, by name."""
    listed = [parent / m for m in _listed_methods(parent)]
    for d in listed:
        if not RunLayout(d).results.is_file():
            raise UserError(f"'{RunLayout(d).results}' not found (method '{d.name}' of "
                            f"'{RunLayout(parent).config}' has no finished state)")
    others = sorted(d for d in parent.iterdir() if d.is_dir() and d not in listed and RunLayout(d).results.is_file())
    return listed + others


def find_runs(dirs: Sequence[str | os.PathLike]) -> list[FoundRun]:
    """Each DIR is a run (it holds results.json) or a parent of one run directory per method.
    A run named twice is taken once. Labels are the method names, made unique with the
    directory when two runs share one."""
    paths: list[Path] = []
    for d in map(Path, dirs):
        if RunLayout(d).results.is_file():
            paths.append(d)
        elif d.is_dir() and (subs := _method_dirs(d)):
            paths += subs
        else:
            raise UserError(f"'{RunLayout(d).results}' not found (not a cilkit run directory, "
                            "nor a parent of run directories)")
    first: dict[Path, Path] = {}
    for p in paths:
        first.setdefault(p.resolve(), p)  # each run once, where it is first named
    paths = list(first.values())
    loaded = [(p, read_results(RunLayout(p).results)) for p in paths]
    names = [str(r.get("method", p.name)) for p, r in loaded]
    return [FoundRun(n if names.count(n) == 1 else f"{n} ({p})", p, r) for n, (p, r) in zip(names, loaded)]


# ----- report.html -----------------------------------------------------------------------------
_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1300px; }
table { border-collapse: collapse; font-size: 14px; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 4px 8px; }
th { background: #e8eef6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #f6f6f6; }
figure { margin: 2em 0; }
img { max-width: 100%; border: 1px solid #ddd; }
figcaption, .note { color: #555; font-size: 13px; max-width: 900px; }
"""

_TABLE_NOTE = (
    "Top-1 accuracy (%) on the test images of all classes seen, after each state. "
    "<em>mean inc.</em>: mean over all states; <em>excl. 1st</em>: without state 0 (as IL2M and "
    "active IL report it). <em>last old / new</em>: top-1 on the old and the new classes after "
    "the last state. <em>forgetting</em>: average forgetting (Chaudhry et al., 2018). "
    "Rows <em>method [x]</em> are other score sets of the same run."
)


def _settings(run_dir: Path) -> str:
    """The main settings from a run's config.yaml (empty when it cannot be read)."""
    try:
        c = yaml.safe_load(RunLayout(run_dir).config.read_text())
        mem = c["memory"]
        budget = f"{mem['total']} in total" if mem.get("total") is not None else f"{mem.get('per_class')} per class"
        return (f" Backbone {c['model']['backbone']}; memory {budget} ({mem['selection']}); "
                f"epochs per state: {c['train']['epochs']}; seed {c['seed']}.")
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return ""


def _describe(runs: Sequence[FoundRun]) -> str:
    datasets = sorted({str(r.results.get("dataset", "?")) for r in runs})
    first = runs[0].results
    return (f"Dataset: {', '.join(datasets)}. {first.get('num_states', len(first['state_ends']))} states; "
            f"classes seen after each state: {', '.join(map(str, first['state_ends']))}."
            + _settings(runs[0].path))


def report_html(runs: Sequence[FoundRun], table: str, figures: Sequence[tuple[str, str, bytes]]) -> str:
    """One HTML file with the table and every figure inlined as a base64 ``data:`` URI: no
    external resource, so it opens offline (a Content-Security-Policy forbids any fetch)."""
    e = html.escape
    figs = "\n".join(
        f'<figure id="{e(name.removesuffix(".png"))}"><img alt="{e(caption)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption>{e(caption)}</figcaption></figure>'
        for name, caption, png in figures
    )
    sources = "".join(f"<li><b>{e(r.label)}</b>: {e(str(r.path))}</li>" for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>cilkit comparison</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Class-incremental comparison</h1>
<p>{e(_describe(runs))}</p>
<h2>Results</h2>
{table}
<p class="note">{_TABLE_NOTE}</p>
<h2>Figures</h2>
{figs}
<h2>Runs</h2>
<ul>{sources}</ul>
<p class="note">Written by cilkit compare.</p>
</body>
</html>
"""


def compare_runs(dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, echo: bool = True) -> Path:
    """Write table.md, table.csv, the figures (PNG) and report.html for the runs in ``dirs``
    into ``out`` (default: the first DIR/report); print the table when ``echo``. Returns ``out``."""
    if not dirs:
        raise UserError("compare: name at least one run directory")
    runs = find_runs(dirs)
    out_dir = Path(out) if out is not None else Path(dirs[0]) / "report"
    results = {r.label: r.results for r in runs}
    figs = make_figures({r.label: r.path for r in runs}, results)  # every input is read before writing
    table = state_table(results)
    io.write_text(out_dir / "table.md", table + "\n")
    io.write_text(out_dir / "table.csv", table_csv(results))
    for name, _, png in figs:
        io.write_bytes(out_dir / name, png)
    io.write_text(out_dir / "report.html", report_html(runs, table_html(results), figs))
    if echo:
        print(table)
        print(f"\nreport: {out_dir / 'report.html'} (table.md, table.csv, {len(figs)} figures)")
    return out_dir
