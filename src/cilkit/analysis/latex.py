"""A comparison's tables as LaTeX: one booktabs ``table`` per protocol, ready to ``\\input``.

The cells are those of :func:`cilkit.analysis.tables.state_table` (``mean $\\pm$ std`` over
several seeds), on the columns a paper shows (:data:`DEFAULT_COLUMNS`, or those named with
``cilkit compare --columns``), in a float that fits the text width of a one-column page, with a
caption naming the protocol, the seeds (and, where the runs' config carries a ``paper:``, the
paper's figure beside theirs: :func:`cilkit.analysis.paper.paper_sentence`) and what the cells
and the bold mean. A value is bold only
where the paired comparison over the shared seeds puts its row above every other row of the column
(:func:`distinguished_row`), never on a reference method's row (``Method.reference``: joint, an
upper bound). With a baseline, a last column gives each row's paired verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cilkit.common.errors import UserError, did_you_mean
from cilkit.cil.shots import SHOT_GROUPS
from cilkit.analysis.significance import LEVEL, paired_interval
from cilkit.analysis.paired import PairedRow, metric_words
from cilkit.analysis.tables import Column, Spread, Table, cell_text


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "−": "-", "≥": r"$\geq$",
                  "→": r"$\rightarrow$", "…": r"\ldots{}"}
HIGHER_BETTER = ("top1_state", "mean_incremental_top1", "last_balanced_top1", "mean_incremental_balanced_top1",
                 "last_top1_old", "last_top1_new", *(f"{p}{g}_shot_top1" for g in SHOT_GROUPS
                                                     for p in ("last_", "mean_incremental_")))  # key prefixes
LOWER_BETTER = ("average_forgetting",)

# --columns: a name -> the key of the table column it shows (``states``: every top1_state<b>,
# ``last``: the last of them); ``method`` is always the first column
COLUMN_KEYS = {
    "method": "method", "runs": "runs", "seeds": "seeds", "states": "top1_state", "last": "top1_state",
    "mean_inc": "mean_incremental_top1", "mean_inc_excl": "mean_incremental_top1_excl_first",
    "bal_last": "last_balanced_top1", "bal_mean_inc": "mean_incremental_balanced_top1",
    "bal_mean_inc_excl": "mean_incremental_balanced_top1_excl_first",
    "last_old": "last_top1_old", "last_new": "last_top1_new", "forgetting": "average_forgetting",
    "time": "wall_time_s",
    # opt-in: the last state's memory-aligned accounting (cilkit.analysis.tables.ACCOUNTING_COLUMNS)
    "model_mb": "last_model_mb", "memory_mb": "last_memory_mb", "total_mb": "last_total_mb",
    "model_in_ex": "last_model_in_exemplars",
    # many-, medium- and few-shot top-1 (cilkit.cil.shots): a long-tailed protocol's tables only
    **{f"{g}_{n}": f"{p}{g}_shot_top1{e}" for g in SHOT_GROUPS for n, p, e in
       (("last", "last_", ""), ("mean_inc", "mean_incremental_", ""),
        ("mean_inc_excl", "mean_incremental_", "_excl_first"))},
}
# the shot columns are skipped where the table has none (a protocol without a long tail)
DEFAULT_COLUMNS = ("mean_inc", "last", "bal_mean_inc", "many_last", "medium_last", "few_last", "forgetting")
_LEGEND = {
    "runs": "runs: the runs of a row", "seeds": "seeds: theirs",
    "states": "N cl.: top-1 after the state with N classes seen", "last": "last: top-1 after the last state",
    "mean_inc": "mean inc.: mean top-1 over the states",
    "mean_inc_excl": "mean inc. (excl. 1st): the same without the first state",
    "bal_last": "bal. last: balanced top-1 (the mean per-class accuracy) after the last state",
    "bal_mean_inc": "bal. mean inc.: mean balanced top-1 (the mean per-class accuracy) over the states",
    "bal_mean_inc_excl": "bal. mean inc. (excl. 1st): the same without the first state",
    "last_old": "last old: top-1 on the old classes after the last state",
    "last_new": "last new: top-1 on the new classes after the last state",
    "forgetting": "forgetting: average forgetting (Chaudhry et al., 2018; lower is better)",
    "time": "time (s): wall time of all states",
    "model_mb": ("model MB: the model after the last state, its parameters and buffers as stored "
                 "(1 MB = 1,000,000 bytes)"),
    "memory_mb": "memory MB: the exemplars after the last state, as the training images are stored",
    "total_mb": "total MB: model and exemplars",
    "model_in_ex": "model in ex.: the model's bytes over one training image's (Zhou et al., 2023)",
    # the groups themselves are in the caption's protocol description (cilkit.cil.shots.shots_sentence)
    **{f"{g}_{n}": f"{g} {t}: {g}-shot top-1{x}" for g in SHOT_GROUPS for n, t, x in
       (("last", "last", " after the last state"), ("mean_inc", "mean inc.", " over the states with such a class"),
        ("mean_inc_excl", "mean inc. (excl. 1st)", ", the same without the first state"))},
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (``_`` -> ``\\_``, ``%`` -> ``\\%``, ...);
    a leading ``[`` is guarded so that it is never read as the optional argument of ``\\\\``."""
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    return "{}" + out if out.startswith("[") else out


def check_columns(names: Sequence[str] | None) -> tuple[str, ...]:
    """The ``--columns`` names, checked (:data:`COLUMN_KEYS`; ``None``: :data:`DEFAULT_COLUMNS`),
    without repeats; an unknown name is one ``UserError`` line listing the known ones."""
    if names is None:
        return DEFAULT_COLUMNS
    picked = [n.strip() for n in names if n.strip()]
    if not picked:
        raise UserError(f"--columns names no column (known: {', '.join(COLUMN_KEYS)})")
    for n in picked:
        if n not in COLUMN_KEYS:
            hint = did_you_mean(n, COLUMN_KEYS)
            raise UserError(f"--columns: unknown column '{n}'" + (f": {hint}" if hint else "")
                            + f" (known: {', '.join(COLUMN_KEYS)})")
    return tuple(dict.fromkeys(n for n in picked if n != "method"))


def selected(table: Table, names: Sequence[str]) -> list[tuple[str, int, Column]]:
    """The table's columns that ``names`` ask for, in that order after the method: (name, index,
    column), ``last`` titled so; a name the table lacks (``runs`` of single runs) is skipped."""
    states = [i for i, c in enumerate(table.columns) if c.key.startswith("top1_state")]
    out: list[tuple[str, int, Column]] = [("method", 0, table.columns[0])]
    for name in names:
        if name == "states":
            out += [(name, i, table.columns[i]) for i in states]
        elif name == "last":
            out += [(name, i, Column("last", table.columns[i].key, table.columns[i].digits)) for i in states[-1:]]
        else:
            out += [(name, i, c) for i, c in enumerate(table.columns) if c.key == COLUMN_KEYS[name]]
    unique: dict[int, tuple[str, int, Column]] = {}
    for entry in out:
        unique.setdefault(entry[1], entry)  # the last state once, with states and last both named
    return list(unique.values())


def _mean(value: Any) -> float | None:
    return value.mean if isinstance(value, Spread) else float(value) if isinstance(value, (int, float)) else None


def _beats(a: Mapping[int, float], b: Mapping[int, float], higher: bool) -> bool:
    """The paired comparison over the seeds both rows ran puts ``a`` above ``b`` (below, when
    lower is better): its :data:`~cilkit.analysis.significance.LEVEL` interval excludes 0."""
    shared = sorted(set(a) & set(b))
    i = paired_interval([a[s] for s in shared], [b[s] for s in shared])
    if i.low is None or i.high is None:
        return False
    return i.low > 0 if higher else i.high < 0


def distinguished_row(table: Table, column: int, rows: Sequence[int]) -> int | None:
    """Of ``rows`` (indices into ``table.rows``), the one whose value of ``column`` the paired
    comparison over the shared seeds puts above every other non-reference row with a value
    (below, for forgetting), or None: no such row, an accuracy or forgetting column only,
    reference rows (joint) never, and never with fewer than two such rows. At most one row can
    be so distinguished, since each comparison of two rows is the negation of the other."""
    c = table.columns[column]
    higher = c.key.startswith(HIGHER_BETTER)
    if not (higher or c.key.startswith(LOWER_BETTER)) or len(table.info) != len(table.rows):
        return None
    contenders = [r for r in rows if not table.info[r].reference and _mean(table.rows[r][column]) is not None]
    if len(contenders) < 2:
        return None
    seeds = {r: table.info[r].by_seed.get(c.key, {}) for r in contenders}
    for r in contenders:
        if all(_beats(seeds[r], seeds[o], higher) for o in contenders if o != r):
            return r
    return None


def _cell(value: Any, digits: int) -> str:
    """A cell as :func:`~cilkit.analysis.tables.cell_text` writes it, the std of a
    :class:`~cilkit.analysis.tables.Spread` in a smaller size: ``75.47\\,{\\scriptsize$\\pm$2.70}``."""
    if isinstance(value, Spread):
        return rf"{value.mean:.{digits}f}\,{{\scriptsize$\pm${value.std:.{digits}f}}}"
    return "--" if value is None else latex_escape(cell_text(value, digits))


def _verdict_cell(row: PairedRow | None, is_base: bool) -> str:
    """A row's verdict against the baseline (LaTeX): the mean difference and ``better``, ``worse``,
    ``n.s.`` (the interval holds 0) or ``n/a`` (fewer than 2 shared seeds); ``baseline`` for its own."""
    if row is None:
        return "baseline" if is_base else "--"
    i = row.interval
    if i.mean is None:
        return "n/a"
    diff = f"${'+' if i.mean >= 0 else '-'}${abs(i.mean):.2f}"
    if i.low is None or i.high is None:
        return f"{diff} n/a"
    return f"{diff} {'better' if i.low > 0 else 'worse' if i.high < 0 else 'n.s.'}"


def _bold_note(table: Table, rows: Sequence[int], any_bold: bool) -> str:
    several = any(len(s) > 1 for r in rows for s in table.info[r].by_seed.values()) if table.info else False
    if not several:
        return "No bold: one seed per row, so no paired comparison tells the rows apart. "
    return (f"Bold: the row that the paired comparison over the shared seeds puts above every other row of the "
            f"column (below, for forgetting): each {LEVEL:.0%} interval (Student's t) of their mean difference "
            "excludes 0" + ("" if any_bold else "; here no row is, in any column") + ". ")


def _caption(table: Table, chosen: Sequence[tuple[str, int, Column]], rows: Sequence[int], description: str,
             any_bold: bool, baseline: str | None, metric: str) -> str:
    names = dict.fromkeys(n for n, _, _ in chosen if n != "method")
    legend = "; ".join(_LEGEND[n] for n in names)
    references = sorted({table.rows[r][0] for r in rows if table.info and table.info[r].reference
                         and table.info[r].variant is None})
    ref = f"Reference (upper bound), never bold: {', '.join(references)}. " if references else ""
    variants = ("Rows method [x]: another score set of the same runs. "
                if table.info and any(table.info[r].variant is not None for r in rows) else "")
    words = metric_words(metric, "the first state")
    verdict = (f"vs. {baseline}: the mean paired difference (method − {baseline}) of the {words} "
               f"over the shared seeds; better / worse: its {LEVEL:.0%} interval "
               "excludes 0; n.s.: it holds 0; n/a: fewer than 2 shared seeds."
               if baseline is not None else "")
    std = ", mean ± std over the seeds (sample std, ddof=1)" if table.repeated else ""
    text = (f"{description} Accuracy (%){std}. {legend}. " + variants
            + _bold_note(table, rows, any_bold) + ref + verdict)
    return latex_escape(" ".join(text.split()))


def _table(table: Table, names: Sequence[str], variants: bool, verdicts: Mapping[str, PairedRow] | None,
           baseline: str | None, metric: str, description: str, label: str) -> str:
    """One protocol's float: a booktabs ``tabular`` of the chosen columns, the bold that the
    paired comparison distinguishes, the verdict column, the caption."""
    rows = [r for r in range(len(table.rows))
            if variants or not table.info or table.info[r].variant is None]
    chosen = selected(table, names)
    spec = "".join("l" if c.key in ("method", "seeds") else "r" for _, _, c in chosen)
    heads = [latex_escape(c.title) for _, _, c in chosen]
    if verdicts is not None and baseline is not None:
        spec += "l"
        heads.append(latex_escape(f"vs. {baseline}"))
    bold = {i: distinguished_row(table, i, rows) for _, i, _ in chosen}
    bases = {baseline, *(r.baseline for r in (verdicts or {}).values())}
    body = []
    for r in rows:
        row = table.rows[r]
        cells = []
        for _, i, c in chosen:
            text = _cell(row[i], c.digits)
            cells.append(rf"\textbf{{{text}}}" if bold[i] == r else text)
        if verdicts is not None and baseline is not None:
            cells.append(_verdict_cell(verdicts.get(row[0]), row[0] in bases))
        body.append(" & ".join(cells) + r" \\")
    caption = _caption(table, chosen, rows, description, any(b is not None for b in bold.values()), baseline,
                       metric if verdicts is not None else "top1")
    return "\n".join([r"\begin{table}[tbp]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}",
                      rf"\begin{{tabular}}{{@{{}}{spec}@{{}}}}", r"\toprule", " & ".join(heads) + r" \\", r"\midrule",
                      *body, r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", rf"\label{{{label}}}",
                      r"\end{table}"])


def table_latex(tables: Sequence[Table], paired: Sequence[PairedRow] | None = None,
                baseline: str | None = None, metric: str = "top1", descriptions: Sequence[str] = (),
                columns: Sequence[str] | None = None, variants: bool = True) -> str:
    """Every protocol's table as a booktabs ``table`` float to ``\\input`` (needs
    ``\\usepackage{booktabs}``): the ``columns`` named (:data:`COLUMN_KEYS`; default
    :data:`DEFAULT_COLUMNS`, which fit a one-column page) of :func:`~cilkit.analysis.tables.state_table`
    (``mean $\\pm$ std`` over several seeds), the variant rows unless ``variants`` is False,
    bold where the paired comparison distinguishes a row (:func:`distinguished_row`), with a
    ``baseline`` a column of each row's paired verdict and mean difference
    (:func:`~cilkit.analysis.paired.paired_rows`), and a caption: the protocol's
    ``descriptions`` (one per table: settings and seeds), then what the cells and the bold mean."""
    names = check_columns(columns)
    lines = [r"% Written by cilkit compare. Needs \usepackage{booktabs} in the preamble.",
             "% Bold: the best value of a column where the paired comparison over the seeds distinguishes it "
             "from every other row (never a reference method such as joint)."]
    parts = []
    for number, t in enumerate(tables, 1):
        verdicts = None if paired is None else {r.label: r for r in paired if r.protocol == number}
        described = descriptions[number - 1] if number <= len(descriptions) else ""
        if len(tables) > 1:
            described = f"Protocol {number}. {described}"
        label = "tab:cilkit" if len(tables) == 1 else f"tab:cilkit-protocol-{number}"
        head = [f"% Protocol {number}"] if len(tables) > 1 else []
        parts.append("\n".join(head + [_table(t, names, variants, verdicts, baseline, metric, described, label)]))
    return "\n".join(lines) + "\n" + "\n".join(parts) + "\n"
