"""Comparison of runs: tables (Markdown, CSV, HTML), the figures of ``cilkit.analysis.plots``, and a
self-contained ``report.html``.

The runs are grouped by protocol and, within one, by method (:mod:`cilkit.analysis.runsets`); each
protocol gets its own table and its own description. A table has one row per group: top-1 after
each state, mean incremental top-1 with and without state 0 (LUCIR includes it; IL2M and active
IL exclude it), top-1 on the old and on the new classes after the last state, average forgetting
(Chaudhry et al., 2018), wall time. A group of several seeds shows every figure as mean ± sample
std over them, with the number of runs and the seeds. Extra score sets of a run (iCaRL's ``cnn``
beside its NME, ...) get their own row, ``icarl [cnn]``; forgetting and time are not defined for
them. The tables are built and rendered in :mod:`cilkit.analysis.tables`; this module describes
the protocols, writes the provenance lines and assembles ``report.html`` (:func:`compare_runs`).
With a baseline method, a second table gives each other method's paired difference from it over
the seeds both ran (:func:`~cilkit.analysis.tables.paired_rows`).
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cilkit import io
from cilkit.errors import UserError
from cilkit.analysis.plots import figures as make_figures
from cilkit.analysis.runsets import Protocol, find_runs, group_runs
from cilkit.analysis.tables import (
    Table,
    build_table,
    paired_csv,
    paired_html,
    paired_markdown,
    paired_rows,
    state_table,
    table_csv,
    table_html,
)

STD_NOTE = ("Rows over several runs: mean ± std over their seeds (std: the sample standard deviation, "
            "ddof=1); runs: their number, seeds: theirs.")


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
