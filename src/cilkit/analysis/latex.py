"""A comparison's tables as LaTeX: one booktabs ``tabular`` per protocol, ready to ``\\input``.

The cells are those of :func:`cilkit.analysis.tables.state_table` (``mean $\\pm$ std`` over
several seeds), the best accuracy per column bold, and with a baseline the paired verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cilkit.analysis.tables import Column, PairedRow, Spread, Table, cell_text, paired_note


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "−": "-", "≥": r"$\geq$"}
HIGHER_BETTER = ("top1_state", "mean_incremental_top1", "last_balanced_top1", "mean_incremental_balanced_top1",
                 "last_top1_old", "last_top1_new")  # key prefixes
LOWER_BETTER = ("average_forgetting",)


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (``_`` -> ``\\_``, ``%`` -> ``\\%``, ...);
    a leading ``[`` is guarded so that it is never read as the optional argument of ``\\\\``."""
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    return "{}" + out if out.startswith("[") else out


def _mean(value: Any) -> float | None:
    return value.mean if isinstance(value, Spread) else value if isinstance(value, float) else None


def _best(table: Table, i: int) -> float | None:
    """The best shown value of column ``i`` (rounded as shown), or None where the column gets no
    bold: not an accuracy or forgetting column, or fewer than two rows with a value."""
    c = table.columns[i]
    better = max if c.key.startswith(HIGHER_BETTER) else min if c.key.startswith(LOWER_BETTER) else None
    shown = [round(m, c.digits) for row in table.rows if (m := _mean(row[i])) is not None]
    return better(shown) if better is not None and len(shown) > 1 else None


def _latex_cell(value: Any, c: Column, best: float | None) -> str:
    text = latex_escape(cell_text(value, c.digits))
    m = _mean(value)
    return rf"\textbf{{{text}}}" if best is not None and m is not None and round(m, c.digits) == best else text


def _verdict_cell(row: PairedRow | None, is_base: bool, baseline: str) -> str:
    """A row's verdict against the baseline with the mean difference, ``baseline`` for its own row."""
    if row is None:
        return "baseline" if is_base else "--"
    i = row.interval
    verdict = i.verdict(baseline).replace(f" from {baseline}", "")
    return latex_escape(verdict if i.mean is None else f"{verdict} ({i.mean:+.2f})")


def _tabular(table: Table, verdicts: Mapping[str, PairedRow] | None, baseline: str | None) -> str:
    """One protocol's ``tabular``: booktabs rules, the bold best per column, the verdict column."""
    shown = table.shown()
    columns = [table.columns[i] for i in shown]
    spec = "".join("l" if c.key in ("method", "seeds") else "r" for c in columns)
    heads = [latex_escape(c.title) for c in columns]
    if verdicts is not None and baseline is not None:
        spec += "l"
        heads.append(latex_escape(f"vs. {baseline}"))
    best = [_best(table, i) for i in shown]
    bases = {baseline, *(r.baseline for r in (verdicts or {}).values())}
    body = []
    for row in table.rows:
        cells = [_latex_cell(row[i], c, b) for i, c, b in zip(shown, columns, best)]
        if verdicts is not None and baseline is not None:
            cells.append(_verdict_cell(verdicts.get(row[0]), row[0] in bases, baseline))
        body.append(" & ".join(cells) + r" \\")
    return "\n".join([rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(heads) + r" \\", r"\midrule",
                      *body, r"\bottomrule", r"\end{tabular}"])


def table_latex(tables: Sequence[Table], paired: Sequence[PairedRow] | None = None,
                baseline: str | None = None, metric: str = "top1") -> str:
    """Every protocol's table as a booktabs ``tabular`` to ``\\input`` (needs ``\\usepackage{booktabs}``):
    the cells of :func:`~cilkit.analysis.tables.state_table` (``mean $\\pm$ std`` over several seeds), the best accuracy
    per column in bold (highest; forgetting: lowest; time: none) and, with a ``baseline``, a column
    with each group's paired verdict and mean difference (:func:`~cilkit.analysis.tables.paired_rows`)."""
    lines = [r"% Written by cilkit compare. Needs \usepackage{booktabs} in the preamble.",
             "% Bold: the best value per column (accuracy: highest; forgetting: lowest).",
             *([f"% {latex_escape(paired_note(baseline, metric))}"] if paired is not None and baseline is not None else [])]
    parts = []
    for number, t in enumerate(tables, 1):
        verdicts = None if paired is None else {r.label: r for r in paired if r.protocol == number}
        head = [f"% Protocol {number}"] if len(tables) > 1 else []
        parts.append("\n".join(head + [_tabular(t, verdicts, baseline)]))
    return "\n".join(lines) + "\n" + "\n\\par\\medskip\n".join(parts) + "\n"
