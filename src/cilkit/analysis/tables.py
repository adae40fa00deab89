"""The comparison tables of runs: one protocol's table built once, and written three ways.

A :class:`Table` has one row per group of runs (:mod:`cilkit.analysis.runsets`) and score set:
top-1 after each state, the mean incremental top-1 with and without state 0, top-1 on the old
and new classes after the last state, average forgetting, wall time and the last state's model and
memory in MB (memory-aligned accounting), each a float or, over
several seeds, a :class:`Spread` (mean ± sample std). Its columns are defined once
(:func:`table_columns`, :func:`build_table`) and rendered as Markdown (:func:`state_table`),
HTML (:func:`table_html`) and CSV (:func:`table_csv`). The paired comparison with a baseline
method lives in :mod:`cilkit.analysis.paired`.
"""

from __future__ import annotations

import csv
import html
import io as _text_io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cilkit.settings.registry import METHODS
from cilkit.cil.metrics import Results, fmt, mean_incremental, variant_names
from cilkit.cil.shots import SHOT_GROUPS, SHOT_KEYS, has_shot_figures, present_mean
from cilkit.analysis.runsets import RunGroup
from cilkit.analysis.significance import mean_std


# ----- the table -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    title: str  # Markdown / HTML heading
    key: str  # CSV heading
    digits: int  # decimals shown in Markdown / HTML (the CSV keeps 6)
    where: str = "all"  # "all", "csv" (CSV only: per-state balanced top-1), "shown" (not in the CSV)


@dataclass(frozen=True)
class Spread:
    """A figure of a group of runs: the mean and the sample std (ddof=1) over its seeds."""

    mean: float
    std: float


@dataclass(frozen=True)
class RowInfo:
    """What a row is beyond its cells (what table.tex's bold and ``--no-variants`` read)."""

    variant: str | None  # the score set of a ``method [x]`` row; None for the method's own scores
    reference: bool  # a row of a reference method (an upper bound: joint), ``Method.reference``
    by_seed: Mapping[str, Mapping[int, float]]  # column key -> the figure of each run of a known seed


@dataclass(frozen=True)
class Table:
    """One protocol's table: its columns and one row per group and score set (a label, then
    ``None``, a float, or a :class:`Spread` for a group of several runs)."""

    columns: list[Column]
    rows: list[list[Any]]
    repeated: bool  # some group has several runs: the table has runs and seeds columns
    info: list[RowInfo] = field(default_factory=list)  # one per row (empty: none known)

    def shown(self) -> list[int]:
        """The indices of the columns of the Markdown, HTML and LaTeX tables."""
        return [i for i, c in enumerate(self.columns) if c.where != "csv"]


def _state_count(results: Results) -> int:
    return max((len(r["states"]) for r in results.values()), default=0)


def _state_titles(results: Results, n: int) -> list[str]:
    """``"4 cl."`` (classes seen) when every run shares the protocol, else ``"state 1"``."""
    ends = {tuple(r["state_ends"][:n]) for r in results.values()}
    if len(ends) == 1:
        return [f"{c} cl." for c in next(iter(ends))]
    return [f"state {b + 1}" for b in range(n)]


MB = 1e6  # bytes in a megabyte, as Zhou et al. (ICLR 2023) count a model's size
# the last state's memory-aligned accounting (results.json's states[b]["accounting"]): the model
# and the exemplars in MB and the model in exemplars (model bytes / one training image's bytes)
ACCOUNTING_COLUMNS = [
    Column("model MB", "last_model_mb", 2),
    Column("memory MB", "last_memory_mb", 2),
    Column("total MB", "last_total_mb", 2),
    Column("model in ex.", "last_model_in_exemplars", 1),
]


def accounting_cells(state: Mapping[str, Any]) -> list[float | None]:
    """The cells of :data:`ACCOUNTING_COLUMNS` from a state's results (None for a run recorded
    before states kept their accounting)."""
    a = state.get("accounting") or {}
    sizes = [a.get(k) for k in ("model_bytes", "memory_bytes", "total_bytes")]
    return [None if v is None else v / MB for v in sizes] + [a.get("model_in_exemplars")]


def shot_columns(state_titles: Sequence[str]) -> list[Column]:
    """Many-, medium- and few-shot top-1 (:mod:`cilkit.cil.shots`) of a long-tailed protocol: each
    group after each state (CSV only), after the last state and its mean over the states where it
    has a seen class (without the first: CSV only)."""
    return [c for g in SHOT_GROUPS for c in (
        *[Column(f"{g} {t}", f"{g}_shot_top1_state{b + 1}", 1, "csv") for b, t in enumerate(state_titles)],
        Column(f"{g} last", f"last_{g}_shot_top1", 1), Column(f"{g} mean inc.", f"mean_incremental_{g}_shot_top1", 2),
        Column(f"{g} mean inc. (excl. 1st)", f"mean_incremental_{g}_shot_top1_excl_first", 2, "csv"))]


def table_columns(state_titles: Sequence[str], repeated: bool = False, shots: bool = False) -> list[Column]:
    """The table's columns: method, (runs and seeds,) top-1 after each state and its means, then
    balanced top-1 (the mean per-class accuracy, which an imbalanced test set tells apart from
    top-1): after each state (CSV only), its means and after the last state; with ``shots`` (a
    long-tailed protocol) :func:`shot_columns`; then old / new top-1 after the last state,
    forgetting and time; then the last state's sizes (:data:`ACCOUNTING_COLUMNS`)."""
    return [
        Column("method", "method", 0),
        *([Column("runs", "runs", 0), Column("seeds", "seeds", 0)] if repeated else []),
        *[Column(t, f"top1_state{b + 1}", 1) for b, t in enumerate(state_titles)],
        Column("mean inc.", "mean_incremental_top1", 2),
        Column("mean inc. (excl. 1st)", "mean_incremental_top1_excl_first", 2),
        *[Column(f"bal. {t}", f"balanced_top1_state{b + 1}", 1, "csv") for b, t in enumerate(state_titles)],
        Column("bal. last", "last_balanced_top1", 1, "shown"),
        Column("bal. mean inc.", "mean_incremental_balanced_top1", 2),
        Column("bal. mean inc. (excl. 1st)", "mean_incremental_balanced_top1_excl_first", 2),
        *(shot_columns(state_titles) if shots else []),
        Column("last old", "last_top1_old", 1),
        Column("last new", "last_top1_new", 1),
        Column("forgetting", "average_forgetting", 1),
        Column("time (s)", "wall_time_s", 1),
        *ACCOUNTING_COLUMNS,
    ]


def _padded(values: list[float | None], n: int) -> list[float | None]:
    return values + [None] * (n - len(values))


def _means(values: list[float | None]) -> list[float | None]:
    """The mean incremental value with and without the first state; None unless every state has one."""
    if not values or any(v is None for v in values):
        return [None, None]
    known = [v for v in values if v is not None]
    return [mean_incremental(known), mean_incremental(known, skip_first=True)]


def _shot_cells(accs: list[Mapping[str, Any]], n: int) -> list[float | None]:
    """The cells of :func:`shot_columns` from a score set's per-state figures."""
    return [c for k in SHOT_KEYS for v in [[a.get(k) for a in accs]]
            for c in (*_padded(v, n), v[-1] if v else None, present_mean(v), present_mean(v, skip_first=True))]


def _score_row(label: str, accs: list[Mapping[str, Any]], n: int, mean_top1: list[float | None],
               forgetting: float | None, wall: float | None, own: bool = True, shots: bool = False) -> list[Any]:
    """A row of :func:`table_columns` from a score set's per-state figures ``accs``; the
    accounting of the last state on the run's ``own`` row only (a score set's row repeats no
    size, as it repeats no time)."""
    last = accs[-1] if accs else {}
    balanced = [a.get("balanced_top1") for a in accs]
    sizes = accounting_cells(last) if own else [None] * len(ACCOUNTING_COLUMNS)
    return [label, *_padded([a.get("top1") for a in accs], n), *mean_top1,
            *_padded(balanced, n), last.get("balanced_top1"), *_means(balanced),
            *(_shot_cells(accs, n) if shots else []),
            last.get("top1_old"), last.get("top1_new"), forgetting, wall, *sizes]


def run_rows(label: str, r: Mapping[str, Any], n: int, shots: bool = False) -> list[list[Any]]:
    """One run's rows (label, then floats or None): its primary scores, then each score set;
    with ``shots`` the cells of :func:`shot_columns`."""
    states = r["states"]
    rows = [_score_row(label, states, n, [r.get("mean_incremental_top1"), r.get("mean_incremental_top1_excl_first")],
                       r.get("average_forgetting"), r.get("wall_time_s"), shots=shots)]
    for v in variant_names(r) if states else []:
        accs = [s.get("variants", {}).get(v, {}) for s in states]
        rows.append(_score_row(f"{label} [{v}]", accs, n, _means([a.get("top1") for a in accs]), None, None,
                               own=False, shots=shots))
    return rows


def _aggregate(values: Sequence[float | None]) -> Spread | None:
    """Mean ± sample std of a figure over a group's runs; None unless every run has it."""
    known = [v for v in values if v is not None]
    if len(known) < len(values) or len(known) < 2:
        return None
    mean, std = mean_std(known)
    assert std is not None
    return Spread(mean, std)


def group_rows(group: RunGroup, n: int, shots: bool = False) -> list[list[Any]]:
    """A group's rows: its run's own (one run), or each cell as a :class:`Spread` over its runs."""
    if not group.repeated:
        return run_rows(group.label, group.runs[0].results, n, shots)
    per_run = [{row[0]: row[1:] for row in run_rows(group.label, r.results, n, shots)} for r in group.runs]
    rows = []
    for label, first in per_run[0].items():
        cells = [c for pr in per_run if (c := pr.get(label)) is not None]
        if len(cells) < len(per_run):  # a score set some run lacks
            rows.append([label] + [None] * len(first))
            continue
        rows.append([label, *[_aggregate(list(col)) for col in zip(*cells)]])
    return rows


def seeds_text(seeds: Sequence[int | None]) -> str:
    return ", ".join("?" if s is None else str(s) for s in seeds)


def is_reference(results: Mapping[str, Any]) -> bool:
    """The run's method (a calibrated run's: its source method) is a reference, an upper bound
    like ``joint`` (``Method.reference`` of the registered class), not a contender."""
    method = (results.get("calibration") or {}).get("source_method") or results.get("method")
    return bool(getattr(METHODS.get(str(method)), "reference", False))


def _row_info(group: RunGroup, label: str, keys: Sequence[str],
              per_run: Sequence[tuple[int | None, Mapping[str, list[Any]]]]) -> RowInfo:
    """A row's :class:`RowInfo`: its score set, whether it is a reference's, and each figure per
    seed (``per_run``: each run's seed and rows by label, :func:`run_rows`)."""
    by_seed: dict[str, dict[int, float]] = {k: {} for k in keys}
    for seed, rows in per_run:
        cells = rows.get(label)
        if seed is None or cells is None:
            continue
        for k, v in zip(keys, cells):
            if isinstance(v, (int, float)):
                by_seed[k][seed] = float(v)
    variant = None if label == group.label else label[len(group.label) + 2:-1]
    return RowInfo(variant, is_reference(group.runs[0].results), by_seed)


def build_table(groups: Sequence[RunGroup]) -> Table:
    """The table of one protocol's groups (the shot columns when some run has shot figures)."""
    results = {g.label: g.runs[0].results for g in groups}
    n = _state_count(results)
    repeated = any(g.repeated for g in groups)
    shots = any(has_shot_figures(r.results) for g in groups for r in g.runs)
    columns = table_columns(_state_titles(results, n), repeated, shots)
    keys = [c.key for c in columns if c.key not in ("method", "runs", "seeds")]
    rows, info = [], []
    for g in groups:
        per_run = [(s, {row[0]: row[1:] for row in run_rows(g.label, r.results, n, shots)})
                   for r, s in zip(g.runs, g.seeds)]
        for row in group_rows(g, n, shots):
            rows.append([row[0], len(g.runs), seeds_text(g.seeds), *row[1:]] if repeated else row)
            info.append(_row_info(g, row[0], keys, per_run))
    return Table(columns, rows, repeated, info)


def cell_text(value: Any, digits: int) -> str:
    """A cell as the tables show it: ``mean ± std`` for a :class:`Spread`, ``-`` for None."""
    if isinstance(value, Spread):
        return f"{value.mean:.{digits}f} ± {value.std:.{digits}f}"
    return str(value) if isinstance(value, int) and digits == 0 else fmt(value, digits)


def _formatted(table: Table) -> list[list[str]]:
    return [[cell_text(row[i], table.columns[i].digits) for i in table.shown()] for row in table.rows]


def _titles(table: Table) -> list[str]:
    return [table.columns[i].title for i in table.shown()]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
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
    return markdown_table(_titles(table), _formatted(table)) if table.rows else ""


def table_html(table: Table) -> str:
    """The same table as an HTML ``<table>`` (numbers right-aligned)."""
    return html_table(_titles(table), _formatted(table))


def _csv_number(v: Any) -> Any:
    """A float to 6 decimals (70.39999999999999 is 70.4; a percentage keeps 4 more digits than
    the tables show), anything else as it is."""
    return round(v, 6) if isinstance(v, float) else v


def table_csv(tables: Sequence[Table]) -> str:
    """Every protocol's table as one CSV, floats to 6 decimals, empty cells for undefined values. With
    several protocols a first column ``protocol`` numbers them; balanced top-1 after each state
    is here (``balanced_top1_state<b>``) and not in the other tables; with repeated runs each figure
    ``key`` (the mean) has a ``key_std`` column (sample std) beside it, plus ``runs``, ``seeds``."""
    repeated = any(t.repeated for t in tables)
    n = max((sum(c.key.startswith("top1_state") for c in t.columns) for t in tables), default=0)
    columns = table_columns([""] * n, repeated, any(c.key.endswith("_shot_top1") for t in tables for c in t.columns))
    keys = ["protocol"] if len(tables) > 1 else []
    for c in columns:
        if c.where != "shown":
            keys += [c.key, f"{c.key}_std"] if repeated and c.digits > 0 else [c.key]
    buf = _text_io.StringIO()
    w = csv.DictWriter(buf, keys, restval="", lineterminator="\n")
    w.writeheader()
    for number, t in enumerate(tables, 1):
        for row in t.rows:
            out: dict[str, Any] = {"protocol": number} if len(tables) > 1 else {}
            for c, v in zip(t.columns, row):
                if c.where == "shown":
                    continue
                if isinstance(v, Spread):
                    out[c.key], out[f"{c.key}_std"] = _csv_number(v.mean), _csv_number(v.std)
                elif v is not None:
                    out[c.key] = _csv_number(v)
            w.writerow(out)
    return buf.getvalue()

