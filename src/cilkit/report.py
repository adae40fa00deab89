"""Comparison of runs: tables (Markdown, CSV, HTML), the figures of ``cilkit.plots``, and a
self-contained ``report.html``.

The runs are grouped by protocol and, within one, by method (:mod:`cilkit.runsets`); each
protocol gets its own table and its own description. A table has one row per group: top-1 after
each state, mean incremental top-1 with and without state 0 (LUCIR includes it; IL2M and active
IL exclude it), top-1 on the old and on the new classes after the last state, average forgetting
(Chaudhry et al., 2018), wall time. A group of several seeds shows every figure as mean ± sample
std over them, with the number of runs and the seeds. Extra score sets of a run (iCaRL's ``cnn``
beside its NME, ...) get their own row, ``icarl [cnn]``; forgetting and time are not defined for
them. The columns are defined once (:func:`table_columns`, :func:`build_table`) and written three
ways. With a baseline method, a second table gives each other method's paired difference from it
over the seeds both ran (:func:`paired_rows`).
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

from cilkit import io
from cilkit.errors import UserError
from cilkit.metrics import Results, fmt, mean_incremental, variant_names
from cilkit.plots import figures as make_figures
from cilkit.runsets import Protocol, RunGroup, find_runs, group_runs
from cilkit.stats_tests import LEVEL, PairedInterval, mean_std, paired_interval


# ----- the table -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    title: str  # Markdown / HTML heading
    key: str  # CSV heading
    digits: int  # decimals shown in Markdown / HTML (the CSV keeps full precision)


@dataclass(frozen=True)
class Spread:
    """A figure of a group of runs: the mean and the sample std (ddof=1) over its seeds."""

    mean: float
    std: float


@dataclass(frozen=True)
class Table:
    """One protocol's table: its columns and one row per group and score set (a label, then
    ``None``, a float, or a :class:`Spread` for a group of several runs)."""

    columns: list[Column]
    rows: list[list[Any]]
    repeated: bool  # some group has several runs: the table has runs and seeds columns


STD_NOTE = ("Rows over several runs: mean ± std over their seeds (std: the sample standard deviation, "
            "ddof=1); runs: their number, seeds: theirs.")


def _state_count(results: Results) -> int:
    return max((len(r["states"]) for r in results.values()), default=0)


def _state_titles(results: Results, n: int) -> list[str]:
    """``"4 cl."`` (classes seen) when every run shares the protocol, else ``"state 1"``."""
    ends = {tuple(r["state_ends"][:n]) for r in results.values()}
    if len(ends) == 1:
        return [f"{c} cl." for c in next(iter(ends))]
    return [f"state {b + 1}" for b in range(n)]


def table_columns(state_titles: Sequence[str], repeated: bool = False) -> list[Column]:
    """The table's columns: method, (runs and seeds,) top-1 after each state, the summaries."""
    return [
        Column("method", "method", 0),
        *([Column("runs", "runs", 0), Column("seeds", "seeds", 0)] if repeated else []),
        *[Column(t, f"top1_state{b + 1}", 1) for b, t in enumerate(state_titles)],
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


def run_rows(label: str, r: Mapping[str, Any], n: int) -> list[list[Any]]:
    """One run's rows (label, then floats or None): its primary scores, then each score set."""
    last = r["states"][-1] if r["states"] else {}
    row = [label, *_padded([s["top1"] for s in r["states"]], n),
           r.get("mean_incremental_top1"), r.get("mean_incremental_top1_excl_first"),
           last.get("top1_old"), last.get("top1_new"), r.get("average_forgetting"), r.get("wall_time_s")]
    return [row] + ([_variant_row(label, v, r, n) for v in variant_names(r)] if r["states"] else [])


def _aggregate(values: Sequence[float | None]) -> Spread | None:
    """Mean ± sample std of a figure over a group's runs; None unless every run has it."""
    known = [v for v in values if v is not None]
    if len(known) < len(values) or len(known) < 2:
        return None
    mean, std = mean_std(known)
    assert std is not None
    return Spread(mean, std)


def group_rows(group: RunGroup, n: int) -> list[list[Any]]:
    """A group's rows: its run's own (one run), or each cell as a :class:`Spread` over its runs."""
    if not group.repeated:
        return run_rows(group.label, group.runs[0].results, n)
    per_run = [{row[0]: row[1:] for row in run_rows(group.label, r.results, n)} for r in group.runs]
    rows = []
    for label, first in per_run[0].items():
        cells = [c for pr in per_run if (c := pr.get(label)) is not None]
        if len(cells) < len(per_run):  # a score set some run lacks
            rows.append([label] + [None] * len(first))
            continue
        rows.append([label, *[_aggregate(list(col)) for col in zip(*cells)]])
    return rows


def _seeds_text(seeds: Sequence[int | None]) -> str:
    return ", ".join("?" if s is None else str(s) for s in seeds)


def build_table(groups: Sequence[RunGroup]) -> Table:
    """The table of one protocol's groups."""
    results = {g.label: g.runs[0].results for g in groups}
    n = _state_count(results)
    repeated = any(g.repeated for g in groups)
    rows = []
    for g in groups:
        for row in group_rows(g, n):
            rows.append([row[0], len(g.runs), _seeds_text(g.seeds), *row[1:]] if repeated else row)
    return Table(table_columns(_state_titles(results, n), repeated), rows, repeated)


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, Spread):
        return f"{value.mean:.{digits}f} ± {value.std:.{digits}f}"
    return str(value) if isinstance(value, int) and digits == 0 else fmt(value, digits)


def _formatted(table: Table) -> list[list[str]]:
    return [[_cell(v, c.digits) for v, c in zip(row, table.columns)] for row in table.rows]


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML ``<table>``: the first column text, the others right-aligned numbers."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td{'' if i == 0 else ' class=num'}>{html.escape(v)}</td>" for i, v in enumerate(row))
        + "</tr>\n"
        for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def state_table(table: Table) -> str:
    """A Markdown table: one row per group (and extra score set), top-1 after each state, then
    the summaries."""
    return _markdown([c.title for c in table.columns], _formatted(table)) if table.rows else ""


def table_html(table: Table) -> str:
    """The same table as an HTML ``<table>`` (numbers right-aligned)."""
    return _html_table([c.title for c in table.columns], _formatted(table))


def table_csv(tables: Sequence[Table]) -> str:
    """Every protocol's table as one CSV, full precision, empty cells for undefined values. With
    several protocols a first column ``protocol`` numbers them; with repeated runs each figure
    ``key`` (the mean) has a ``key_std`` column (sample std) beside it, plus ``runs``, ``seeds``."""
    repeated = any(t.repeated for t in tables)
    n = max((sum(c.key.startswith("top1_state") for c in t.columns) for t in tables), default=0)
    columns = table_columns([""] * n, repeated)
    keys = ["protocol"] if len(tables) > 1 else []
    for c in columns:
        keys += [c.key, f"{c.key}_std"] if repeated and c.digits > 0 else [c.key]
    buf = _text_io.StringIO()
    w = csv.DictWriter(buf, keys, restval="", lineterminator="\n")
    w.writeheader()
    for number, t in enumerate(tables, 1):
        for row in t.rows:
            out: dict[str, Any] = {"protocol": number} if len(tables) > 1 else {}
            for c, v in zip(t.columns, row):
                if isinstance(v, Spread):
                    out[c.key], out[f"{c.key}_std"] = v.mean, v.std
                elif v is not None:
                    out[c.key] = v
            w.writerow(out)
    return buf.getvalue()


# ----- paired comparison with a baseline -------------------------------------------------------
PAIRED_KEY = "mean_incremental_top1_excl_first"


@dataclass(frozen=True)
class PairedRow:
    """A group's paired difference from the baseline of its protocol over their shared seeds."""

    protocol: int
    label: str
    baseline: str
    seeds: tuple[int, ...]
    interval: PairedInterval


def _by_seed(group: RunGroup) -> dict[int, float]:
    """The group's :data:`PAIRED_KEY` per known seed."""
    return {s: v for r, s in zip(group.runs, group.seeds) if s is not None and (v := r.results.get(PAIRED_KEY)) is not None}


def paired_rows(protocols: Sequence[Protocol], baseline: str) -> list[PairedRow]:
    """For each protocol holding a group of method ``baseline``: every other group's paired
    difference (method - baseline) of :data:`PAIRED_KEY` over the seeds both ran, with its
    :data:`~cilkit.stats_tests.LEVEL` interval (paired t)."""
    methods = sorted({g.method for p in protocols for g in p.groups})
    if baseline not in methods:
        raise UserError(f"--baseline '{baseline}': no compared run is of that method (methods: {', '.join(methods)})")
    rows = []
    for p in protocols:
        bases = [g for g in p.groups if g.method == baseline]
        if len(bases) > 1:
            raise UserError(f"--baseline '{baseline}': protocol {p.number} holds several groups of it "
                            f"({'; '.join(g.label for g in bases)}): compare them separately")
        if not bases:
            continue
        base = _by_seed(bases[0])
        for g in p.groups:
            if g is bases[0]:
                continue
            mine = _by_seed(g)
            shared = tuple(sorted(set(mine) & set(base)))
            rows.append(PairedRow(p.number, g.label, bases[0].label, shared,
                                  paired_interval([mine[s] for s in shared], [base[s] for s in shared])))
    return rows


_PAIRED_HEADERS = ["method", "pairs", "seeds", "mean diff.", f"{LEVEL:.0%} CI", "verdict"]


def _paired_cells(row: PairedRow, baseline: str) -> list[str]:
    i = row.interval
    ci = "-" if i.low is None or i.high is None else f"[{i.low:.2f}, {i.high:.2f}]"
    mean = "-" if i.mean is None else f"{i.mean:+.2f}"
    return [row.label, str(i.pairs), _seeds_text(row.seeds) or "-", mean, ci, i.verdict(baseline)]


def paired_note(baseline: str) -> str:
    return (f"Paired difference from {baseline} (method − {baseline}) of the mean incremental top-1 "
            f"excluding state 1, over the seeds both ran; {LEVEL:.0%} confidence interval of the mean "
            "difference from Student's t with pairs − 1 degrees of freedom. Verdict: better / worse when "
            "the interval excludes 0.")


def paired_markdown(protocols: Sequence[Protocol], rows: Sequence[PairedRow], baseline: str) -> str:
    """The paired comparison in Markdown: a note, then a table per protocol."""
    parts = [paired_note(baseline)]
    for p in protocols:
        mine = [_paired_cells(r, baseline) for r in rows if r.protocol == p.number]
        head = f"Protocol {p.number}:" if len(protocols) > 1 else ""
        if not mine:
            parts.append(f"{head or 'No paired comparison:'} no other method beside a run of {baseline}."
                         if any(g.method == baseline for g in p.groups) else f"{head} no run of {baseline}.")
        else:
            parts.append("\n\n".join(filter(None, [head, _markdown(_PAIRED_HEADERS, mine)])))
    return "\n\n".join(parts)


def paired_html(protocols: Sequence[Protocol], rows: Sequence[PairedRow], baseline: str) -> str:
    """The paired comparison in HTML: a table per protocol, then the note."""
    parts = []
    for p in protocols:
        mine = [_paired_cells(r, baseline) for r in rows if r.protocol == p.number]
        if len(protocols) > 1:
            parts.append(f"<h3>Protocol {p.number}</h3>")
        parts.append(_html_table(_PAIRED_HEADERS, mine) if mine else
                     f"<p>No paired comparison (no run of {html.escape(baseline)} or no other method).</p>")
    return "\n".join(parts) + f'\n<p class="note">{html.escape(paired_note(baseline))}</p>'


def paired_csv(rows: Sequence[PairedRow]) -> str:
    """The paired comparison as CSV (full precision)."""
    buf = _text_io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["protocol", "method", "baseline", "metric", "pairs", "seeds", "mean_difference",
                f"ci{LEVEL * 100:.0f}_low", f"ci{LEVEL * 100:.0f}_high", "verdict"])
    for r in rows:
        i = r.interval
        w.writerow([r.protocol, r.label, r.baseline, PAIRED_KEY, i.pairs, " ".join(map(str, r.seeds)),
                    *("" if v is None else v for v in (i.mean, i.low, i.high)), i.verdict(r.baseline)])
    return buf.getvalue()


# ----- protocols described ---------------------------------------------------------------------
def describe_memory(memory: Mapping[str, Any] | None) -> str:
    """A memory config (config.yaml's ``memory``) in words, as a run's first line says it:
    ``none`` (no budget, or a budget of 0), ``K exemplars`` (``total``) or ``N per class``
    (``per_class``), then the selection, ``60 exemplars (herding)``."""
    memory = memory or {}
    total, per_class = memory.get("total"), memory.get("per_class")
    budget = f"{total} exemplars" if total else f"{per_class} per class" if per_class else None
    if budget is None:
        return "none"
    selection = memory.get("selection")
    return f"{budget} ({selection})" if selection else budget


def _settings(config: Mapping[str, Any] | None) -> str:
    """The main settings from a run's config.yaml (empty when it cannot be read)."""
    if config is None:
        return ""
    try:
        return (f" Backbone {config['model']['backbone']}; memory {describe_memory(config.get('memory'))}; "
                f"epochs per state: {config['train']['epochs']}")
    except (KeyError, TypeError, AttributeError):
        return ""


def describe_protocol(p: Protocol) -> str:
    """What every run of the protocol shares (dataset, states, settings), and its seeds."""
    r = p.results
    seeds = sorted({s for g in p.groups for s in g.seeds if s is not None})
    settings = _settings(p.config)
    seed_text = "" if not seeds else f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    tail = (f"{settings}; {seed_text}." if settings and seed_text else f"{settings}." if settings
            else f" {seed_text[0].upper()}{seed_text[1:]}." if seed_text else "")
    return (f"Dataset: {r.get('dataset', '?')}. {r.get('num_states', len(r['state_ends']))} states; "
            f"classes seen after each state: {', '.join(map(str, r['state_ends']))}." + tail)


def comparison_markdown(protocols: Sequence[Protocol], tables: Sequence[Table]) -> str:
    """The table of each protocol (headed by its description when there are several), and the
    note on std when some row is over several runs."""
    if len(protocols) == 1:
        parts = [state_table(tables[0])]
    else:
        parts = [f"Protocol {p.number}: {describe_protocol(p)}\n\n{state_table(t)}" for p, t in zip(protocols, tables)]
    if any(t.repeated for t in tables):
        parts.append(STD_NOTE)
    return "\n\n".join(parts)


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


def _header_html(protocols: Sequence[Protocol]) -> str:
    e = html.escape
    if len(protocols) == 1:
        return f"<p>{e(describe_protocol(protocols[0]))}</p>"
    items = "".join(f"<li><b>Protocol {p.number}</b>: {e(describe_protocol(p))}</li>" for p in protocols)
    return f"<p>{len(protocols)} protocols, each with its own table:</p>\n<ul>{items}</ul>"


def _results_html(protocols: Sequence[Protocol], tables: Sequence[Table]) -> str:
    if len(protocols) == 1:
        body = table_html(tables[0])
    else:
        body = "\n".join(f"<h3>Protocol {p.number}</h3>\n<p>{html.escape(describe_protocol(p))}</p>\n{table_html(t)}"
                         for p, t in zip(protocols, tables))
    std = f" {html.escape(STD_NOTE)}" if any(t.repeated for t in tables) else ""
    return f'{body}\n<p class="note">{_TABLE_NOTE}{std}</p>'


def _sources_html(protocols: Sequence[Protocol]) -> str:
    e = html.escape
    return "".join(f"<li><b>{e(g.label)}</b>{'' if s is None else f' (seed {s})'}: {e(str(r.path))}"
                   f"{_provenance_html(r.results.get('provenance'))}</li>"
                   for p in protocols for g in p.groups for r, s in zip(g.runs, g.seeds))


def provenance_line(prov: dict[str, Any] | None) -> str:
    """Where a run was made, in one line (empty for runs older than the ``provenance`` record)."""
    if not prov:
        return ""
    commit = f" ({str(prov['git_commit'])[:12]})" if prov.get("git_commit") else ""
    resumed = f", resumed {len(prov['resumed'])}x" if prov.get("resumed") else ""
    return (f"cilkit {prov.get('cilkit')}{commit}, torch {prov.get('torch')}, {prov.get('device_name')} "
            f"({prov.get('device')}, {prov.get('threads')} threads, {prov.get('precision')}, "
            f"{prov.get('memory_format')}); {prov.get('started')} to {prov.get('finished')}{resumed}; "
            f"command: {prov.get('command')}")


def _provenance_html(prov: dict[str, Any] | None) -> str:
    line = provenance_line(prov)
    return f'<br><span class="note">{html.escape(line)}</span>' if line else ""


def report_html(protocols: Sequence[Protocol], tables: Sequence[Table], figures: Sequence[tuple[str, str, bytes]],
                paired: str = "") -> str:
    """One HTML file with the tables and every figure inlined as a base64 ``data:`` URI: no
    external resource, so it opens offline (a Content-Security-Policy forbids any fetch)."""
    e = html.escape
    figs = "\n".join(
        f'<figure id="{e(name.removesuffix(".png"))}"><img alt="{e(caption)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption>{e(caption)}</figcaption></figure>'
        for name, caption, png in figures
    )
    paired_section = f"<h2>Paired comparison</h2>\n{paired}\n" if paired else ""
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
{_header_html(protocols)}
<h2>Results</h2>
{_results_html(protocols, tables)}
{paired_section}<h2>Figures</h2>
{figs}
<h2>Runs</h2>
<ul>{_sources_html(protocols)}</ul>
<p class="note">Written by cilkit compare.</p>
</body>
</html>
"""


def compare_runs(dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, echo: bool = True,
                 baseline: str | None = None) -> Path:
    """Write table.md, table.csv, the figures (PNG) and report.html for the runs in ``dirs``
    into ``out`` (default: the first DIR/report), and with a ``baseline`` method paired.csv;
    print the tables when ``echo``. Returns ``out``."""
    if not dirs:
        raise UserError("compare: name at least one run directory")
    protocols = group_runs(find_runs(dirs))
    paired = paired_rows(protocols, baseline) if baseline is not None else None
    out_dir = Path(out) if out is not None else Path(dirs[0]) / "report"
    groups = [g for p in protocols for g in p.groups]
    results = {g.label: g.runs[0].results for g in groups}
    repeats = {g.label: [r.results for r in g.runs] for g in groups if g.repeated}
    figs = make_figures({g.label: g.runs[0].path for g in groups}, results, repeats)  # every input is read before writing
    tables = [build_table(p.groups) for p in protocols]
    text = comparison_markdown(protocols, tables)
    if paired is not None and baseline is not None:
        text += "\n\n" + paired_markdown(protocols, paired, baseline)
        io.write_text(out_dir / "paired.csv", paired_csv(paired))
    io.write_text(out_dir / "table.md", text + "\n")
    io.write_text(out_dir / "table.csv", table_csv(tables))
    for name, _, png in figs:
        io.write_bytes(out_dir / name, png)
    html_paired = paired_html(protocols, paired, baseline) if paired is not None and baseline is not None else ""
    io.write_text(out_dir / "report.html", report_html(protocols, tables, figs, html_paired))
    if echo:
        print(text)
        extra = ", paired.csv" if paired is not None else ""
        print(f"\nreport: {out_dir / 'report.html'} (table.md, table.csv{extra}, {len(figs)} figures)")
    return out_dir
