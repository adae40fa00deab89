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
the seeds both ran (:func:`~cilkit.analysis.paired.paired_rows`). A run whose training diverged
has no results: it is listed under the tables (method, seed, state, epoch, loss term), never a row.

A comparison is written only where it may be (:func:`report_target`): a new or empty directory,
an earlier comparison's (marked by :data:`COMPARE_MARKER`, written first), or the own
``report/`` of a run compared; never into a run or over files compare did not write. Without
``out``, one directory gets its own ``report/`` regenerated and several get a new directory
``runs/compare-<A>-<B>`` (``-2``, ``-3``, ... when taken: :func:`default_out`), so that comparing
runs never replaces the report of one of them.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cilkit.cil.scenario import describe_imbalance
from cilkit.cil.shots import has_shot_figures, shots_sentence
from cilkit.common import io
from cilkit.common.errors import UserError
from cilkit.rundir.layout import RunLayout, enclosing_run, fresh_directory, holds_run, is_run_dir
from cilkit.analysis.latex import check_columns, table_latex
from cilkit.analysis.paper import PaperComparison, paper_comparisons, paper_html, paper_markdown, paper_sentence
from cilkit.analysis.plots import figures as make_figures
from cilkit.analysis.runsets import DivergedRun, FoundRun, Protocol, group_runs, regimes_sentence, scan_runs
from cilkit.analysis.runsets import find_runs  # noqa: F401 (imported from here too)
from cilkit.analysis.paired import paired_csv, paired_html, paired_markdown, paired_rows
from cilkit.analysis.tables import Table, build_table, state_table, table_csv, table_html

STD_NOTE = ("Rows over several runs: mean ± std over their seeds (std: the sample standard deviation, "
            "ddof=1); runs: their number, seeds: theirs.")


# ----- protocols described ---------------------------------------------------------------------
def describe_memory(memory: Mapping[str, Any] | None) -> str:
    """A memory config (config.yaml's ``memory``) in words, as a run's first line says it:
    ``none`` (no budget, or a budget of 0), ``K exemplars`` (``total``), ``N per class``
    (``per_class``) or ``B bytes shared with the model`` (``budget_bytes``), then the selection,
    ``60 exemplars (herding)``."""
    memory = memory or {}
    total, per_class, shared = memory.get("total"), memory.get("per_class"), memory.get("budget_bytes")
    budget = (f"{total} exemplars" if total else f"{per_class} per class" if per_class else
              f"{shared} bytes shared with the model" if shared else None)
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
    """What every run of the protocol shares (dataset, states, settings, imbalance profile and,
    when long-tailed, its shot groups), and its seeds."""
    r = p.results
    seeds = sorted({s for g in p.groups for s in g.seeds if s is not None})
    settings = _settings(p.config)
    seed_text = "" if not seeds else f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    tail = (f"{settings}; {seed_text}." if settings and seed_text else f"{settings}." if settings
            else f" {seed_text[0].upper()}{seed_text[1:]}." if seed_text else "")
    return (f"Dataset: {r.get('dataset', '?')}. {r.get('num_states', len(r['state_ends']))} states; "
            f"classes seen after each state: {', '.join(map(str, r['state_ends']))}." + tail
            + describe_imbalance(r.get("imbalance"))
            + shots_sentence(next((x.results for g in p.groups for x in g.runs if has_shot_figures(x.results)), r))
            + regimes_sentence(p))



def comparison_markdown(protocols: Sequence[Protocol], tables: Sequence[Table],
                        papers: Sequence[Sequence[PaperComparison]] = ()) -> str:
    """The table of each protocol headed by its description (:func:`describe_protocol`, with
    the imbalance profile; ``Protocol k:`` before it when there are several), as report.html
    heads it, then its paper's figure beside the runs' (``papers``, one list per protocol:
    :func:`~cilkit.analysis.paper.paper_markdown`, where a run's config has a ``paper:``), and
    the note on std when some row is over several runs."""
    def paper(k: int) -> str:
        text = paper_markdown(papers[k]) if k < len(papers) else ""
        return f"\n\n{text}" if text else ""

    if len(protocols) == 1:
        parts = [f"{describe_protocol(protocols[0])}\n\n{state_table(tables[0])}{paper(0)}"]
    else:
        parts = [f"Protocol {p.number}: {describe_protocol(p)}\n\n{state_table(t)}{paper(k)}"
                 for k, (p, t) in enumerate(zip(protocols, tables))]
    if any(t.repeated for t in tables):
        parts.append(STD_NOTE)
    return "\n\n".join(parts)


def diverged_markdown(diverged: Sequence[DivergedRun]) -> str:
    """The runs whose training diverged, one line each (no row of a table: they have no
    results); empty when none did."""
    if not diverged:
        return ""
    return "Diverged (no results, not in the tables):\n\n" + "\n".join(f"- {d.line()}" for d in diverged)


def _diverged_html(diverged: Sequence[DivergedRun]) -> str:
    if not diverged:
        return ""
    items = "".join(f"<li>{html.escape(d.line())}</li>" for d in diverged)
    return f"<h2>Diverged</h2>\n<p>No results, not in the tables:</p>\n<ul>{items}</ul>\n"


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
    "<em>mean inc.</em>: mean over all states; <em>excl. 1st</em>: without the first state (as IL2M and "
    "active IL report it). <em>bal.</em>: balanced top-1, the mean of the per-class accuracies (what an "
    "imbalanced test set tells apart from top-1). <em>last old / new</em>: top-1 on the old and the new classes after "
    "the last state. <em>forgetting</em>: average forgetting (Chaudhry et al., 2018). "
    "Rows <em>method [x]</em> are other score sets of the same run."
)
_SHOTS_NOTE = (" <em>many / medium / few</em>: top-1 on the test images of the seen many-, medium- and few-shot "
               "classes (the groups by training images per class in the protocol's description); their <em>mean "
               "inc.</em> is over the states in which the group has a seen class.")


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
    shots = _SHOTS_NOTE if any(c.key.endswith("_shot_top1") for t in tables for c in t.columns) else ""
    return f'{body}\n<p class="note">{_TABLE_NOTE}{shots}{std}</p>'


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
    ranks = f", {prov['ranks']} ranks ({prov.get('backend')})" if (prov.get("ranks") or 1) > 1 else ""  # torchrun
    return (f"cilkit {prov.get('cilkit')}{commit}, torch {prov.get('torch')}, {prov.get('device_name')} "
            f"({prov.get('device')}{ranks}, {prov.get('threads')} threads, {prov.get('precision')}, "
            f"{prov.get('memory_format')}); {prov.get('started')} to {prov.get('finished')}{resumed}; "
            f"command: {prov.get('command')}")


def _provenance_html(prov: dict[str, Any] | None) -> str:
    line = provenance_line(prov)
    return f'<br><span class="note">{html.escape(line)}</span>' if line else ""


def _paper_html(protocols: Sequence[Protocol], papers: Sequence[Sequence[PaperComparison]]) -> str:
    """The section putting each protocol's paper figure beside its runs' (empty without any)."""
    parts = []
    for p, comparisons in zip(protocols, papers):
        if comparisons:
            head = f"<h3>Protocol {p.number}</h3>\n" if len(protocols) > 1 else ""
            parts.append(head + paper_html(comparisons))
    return f"<h2>Paper</h2>\n{chr(10).join(parts)}\n" if parts else ""


def report_html(protocols: Sequence[Protocol], tables: Sequence[Table], figures: Sequence[tuple[str, str, bytes]],
                paired: str = "", diverged: Sequence[DivergedRun] = (),
                papers: Sequence[Sequence[PaperComparison]] = ()) -> str:
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
{_paper_html(protocols, papers)}{_diverged_html(diverged)}{paired_section}<h2>Figures</h2>
{figs}
<h2>Runs</h2>
<ul>{_sources_html(protocols)}</ul>
<p class="note">Written by cilkit compare.</p>
</body>
</html>
"""


# ----- where a comparison may be written ------------------------------------------------------
COMPARE_MARKER = ".cilkit-compare"  # written first into a directory compare writes (it lists compare's files)


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).resolve()


def is_own_report(out: Path, runs: Sequence[FoundRun]) -> bool:
    """``out`` is ``<run>/report`` of a run compared (or of a parent of the runs compared, as
    ``cilkit run`` writes its report): the run's own report directory, always its to write."""
    parent = out.parent
    if out != RunLayout(parent).report or out.is_symlink():
        return False
    if not (is_run_dir(parent) or RunLayout(parent).results.is_file()):
        return False
    home = _resolved(parent)
    return any(home == (p := _resolved(r.path)) or home in p.parents for r in runs)


def _run_around(out: Path, runs: Sequence[FoundRun]) -> Path | None:
    """The run compared, or any other cilkit run, that ``out`` is or lies inside."""
    here = _resolved(out)
    for run in runs:
        if here == (p := _resolved(run.path)) or p in here.parents:
            return run.path
    return enclosing_run(out)


def _listed_files(out: Path) -> list[str]:
    """The files an earlier comparison wrote into ``out``, as its marker lists them."""
    try:
        files = json.loads((out / COMPARE_MARKER).read_text()).get("files")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str) and f == Path(f).name] if isinstance(files, list) else []


def report_target(out: Path, runs: Sequence[FoundRun]) -> list[str] | None:
    """Check that the comparison of ``runs`` may be written into ``out``: a new or empty
    directory, an earlier output of ``cilkit compare`` (its marker, :data:`COMPARE_MARKER`)
    holding nothing else, or a compared run's own ``report/``. A run (compared or not), a
    directory inside one or holding one, or one with other files is refused (``UserError``),
    before anything is written. Returns the files the earlier comparison wrote (replaced),
    or None for a run's own report directory (which gets no marker)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"compare: --out '{out}' is a file, not a directory")
    if is_own_report(out, runs):
        return None
    run = _run_around(out, runs)
    if run is not None:
        where = "is" if _resolved(run) == _resolved(out) else "lies inside"
        raise UserError(f"compare: --out '{out}' {where} the cilkit run '{run}': choose a new or empty directory "
                        "outside it")
    if holds_run(out) or RunLayout(out).results.is_file():
        raise UserError(f"compare: --out '{out}' holds a cilkit run: choose a new or empty directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    previous = _listed_files(out) if COMPARE_MARKER in entries else []
    foreign = [n for n in entries if n != COMPARE_MARKER and n not in previous]
    if foreign:
        shown = ", ".join(f"'{n}'" for n in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise UserError(f"compare: --out '{out}' holds files that are not a cilkit compare output ({shown}): "
                        "choose a new or empty directory")
    return previous


def write_report(out: Path, files: Mapping[str, str | bytes], previous: list[str] | None) -> None:
    """Write ``files`` (name -> text or bytes) into ``out``. Unless it is a run's own report
    directory (``previous`` None): first the files of the earlier comparison that this one does
    not write again are removed, then the marker listing this one's files is written."""
    if previous is not None:
        for name in previous:
            stale = out / name
            if name not in files and (stale.is_file() or stale.is_symlink()):
                stale.unlink()
        io.write_json(out / COMPARE_MARKER, {"files": sorted(files)})
    for name, content in files.items():
        if isinstance(content, bytes):
            io.write_bytes(out / name, content)
        else:
            io.write_text(out / name, content)


def default_out(dirs: Sequence[str | os.PathLike], root: Path = Path("runs")) -> Path:
    """Where a comparison of several directories goes without ``out``: ``root/compare-<A>-<B>``
    (their names, then ``-and-<k>-more`` beyond two), made fresh when it is written."""
    names = [re.sub(r"[^A-Za-z0-9._+-]+", "_", Path(os.path.abspath(d)).name) or "run" for d in dirs]
    more = f"-and-{len(names) - 2}-more" if len(names) > 2 else ""
    return root / ("compare-" + "-".join(names[:2]) + more)


def _check_fresh(base: Path, runs: Sequence[FoundRun]) -> list[str]:
    """A fresh directory named after ``base`` may be made: ``base`` lies inside no run."""
    run = _run_around(base, runs)
    if run is not None:
        raise UserError(f"compare: the default output '{base}' lies inside the cilkit run '{run}': "
                        "give --out a new or empty directory outside it")
    return []


def _check_baseline_trained(baseline: str | None, runs: Sequence[FoundRun], diverged: Sequence[DivergedRun]) -> None:
    """Refuse a ``baseline`` method whose every run diverged, saying so (not "no such method")."""
    if baseline is None or any(r.results.get("method") == baseline for r in runs):
        return
    gone = [d for d in diverged if d.record.get("method") == baseline]
    if gone:
        raise UserError(f"--baseline '{baseline}': the training of its run diverged, nothing to pair the others with "
                        f"({gone[0].line()})")


def compare_runs(dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, echo: bool = True,
                 baseline: str | None = None, metric: str = "top1", y_range: str = "fit",
                 columns: Sequence[str] | None = None, variants: bool = True, regimes: bool = False) -> Path:
    """Write table.md, table.csv, table.tex, the figures (PNG, PDF) and report.html for the runs in
    ``dirs`` into ``out``, and with a ``baseline`` method paired.csv; print the tables when
    ``echo``. Default ``out``: a single DIR's own DIR/report, else a new :func:`default_out`
    directory (no run's file is touched). ``out`` must be compare's to write (:func:`report_target`);
    every input is read and every check made before anything is written. ``columns`` and
    ``variants`` shape table.tex alone (:func:`~cilkit.analysis.latex.table_latex`: the paper's
    table); the other tables keep every column and row. ``regimes``: runs whose training
    settings differ are one protocol, each method's differing settings said in its description
    (:func:`~cilkit.analysis.runsets.group_runs`). Returns ``out``."""
    if not dirs:
        raise UserError("compare: name at least one run directory")
    columns = check_columns(columns)
    runs, diverged = scan_runs(dirs)
    if not runs:
        raise UserError(f"compare: no run to tabulate: the training of every run named diverged ({diverged[0].line()}"
                        + (f"; and {len(diverged) - 1} more" if len(diverged) > 1 else "") + ")")
    fresh = out is None and len(dirs) > 1
    out_dir = Path(out) if out is not None else default_out(dirs) if fresh else Path(dirs[0]) / "report"
    previous = _check_fresh(out_dir, runs) if fresh else report_target(out_dir, runs)
    _check_baseline_trained(baseline, runs, diverged)
    protocols = group_runs(runs, regimes, lead=baseline)
    paired = paired_rows(protocols, baseline, metric) if baseline is not None else None
    papers = [paper_comparisons(p) for p in protocols]  # where a run's config carries the paper's figure
    groups = [g for p in protocols for g in p.groups]
    results = {g.label: g.runs[0].results for g in groups}
    repeats = {g.label: [r.results for r in g.runs] for g in groups if g.repeated}
    figs = make_figures({g.label: g.runs[0].path for g in groups}, results, repeats, y_range=y_range,
                        repeat_dirs={g.label: [r.path for r in g.runs] for g in groups if g.repeated})
    tables = [build_table(p.groups) for p in protocols]
    text = comparison_markdown(protocols, tables, papers)
    if diverged:
        text += "\n\n" + diverged_markdown(diverged)
    files: dict[str, str | bytes] = {}
    if paired is not None and baseline is not None:
        text += "\n\n" + paired_markdown(protocols, paired, baseline, metric)
        files["paired.csv"] = paired_csv(paired)
    files.update({"table.md": text + "\n", "table.csv": table_csv(tables),
                  "table.tex": table_latex(tables, paired, baseline, metric,
                                           [" ".join(filter(None, [describe_protocol(p), paper_sentence(c)]))
                                            for p, c in zip(protocols, papers)], columns, variants)})
    for f in figs:  # each figure as PNG (also in report.html) and as vector PDF
        files.update({f.name: f.png, f.pdf_name: f.pdf})
    html_paired = paired_html(protocols, paired, baseline, metric) if paired is not None and baseline is not None else ""
    files["report.html"] = report_html(protocols, tables, [(f.name, f.caption, f.png) for f in figs], html_paired,
                                       diverged, papers)
    if fresh:
        out_dir = fresh_directory(out_dir)
    write_report(out_dir, files, previous)
    if echo:
        print(text)
        extra = ", paired.csv" if paired is not None else ""
        print(f"\nreport: {out_dir / 'report.html'} (table.md, table.csv, table.tex{extra}, "
              f"{len(figs)} figures as PNG and PDF)")
    return out_dir
