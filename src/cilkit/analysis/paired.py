"""The paired comparison of every method with a baseline method over their shared seeds.

For each protocol holding a group of the baseline: every other group's paired difference
(method - baseline) of one figure of results.json (``--metric``, :data:`PAIRED_METRICS`) over the
seeds both ran, with its :data:`~cilkit.analysis.significance.LEVEL` interval (paired t), and
its renderers (Markdown, HTML, CSV). The figures: the mean incremental top-1 or balanced top-1
excluding state 1 and, for long-tailed protocols, the many-, medium- and few-shot top-1
(:mod:`cilkit.cil.shots`), their mean incremental value excluding state 1 (``few_shot_top1``)
or their value after the last state (``last_few_shot_top1``).
"""

from __future__ import annotations

import csv
import html
import io as _text_io
from collections.abc import Sequence
from dataclasses import dataclass

from cilkit.common.errors import UserError
from cilkit.cil.shots import SHOT_GROUPS
from cilkit.analysis.runsets import Protocol, RunGroup
from cilkit.analysis.significance import LEVEL, PairedInterval, paired_interval
from cilkit.analysis.tables import html_table, markdown_table, seeds_text

# --metric -> results.json key
PAIRED_METRICS = {"top1": "mean_incremental_top1_excl_first",
                  "balanced_top1": "mean_incremental_balanced_top1_excl_first",
                  **{f"{g}_shot_top1": f"mean_incremental_{g}_shot_top1_excl_first" for g in SHOT_GROUPS},
                  **{f"last_{g}_shot_top1": f"last_{g}_shot_top1" for g in SHOT_GROUPS}}
_METRIC_WORDS = {"top1": "top-1", "balanced_top1": "balanced top-1 (mean per-class accuracy)",
                 **{f"{g}_shot_top1": f"{g}-shot top-1" for g in SHOT_GROUPS}}


def metric_words(metric: str, first: str = "state 1") -> str:
    """The figure ``--metric`` pairs, in words: ``mean incremental top-1 excluding state 1``,
    ``few-shot top-1 after the last state`` (``first``: how the first state is named)."""
    if metric.startswith("last_"):
        return f"{_METRIC_WORDS[metric.removeprefix('last_')]} after the last state"
    return f"mean incremental {_METRIC_WORDS[metric]} excluding {first}"


@dataclass(frozen=True)
class PairedRow:
    """A group's paired difference from the baseline of its protocol over their shared seeds."""

    protocol: int
    label: str
    baseline: str
    seeds: tuple[int, ...]
    interval: PairedInterval
    metric: str = "top1"  # a key of PAIRED_METRICS


def _by_seed(group: RunGroup, key: str) -> dict[int, float]:
    """The group's figure ``key`` of results.json per known seed."""
    return {s: v for r, s in zip(group.runs, group.seeds) if s is not None and (v := r.results.get(key)) is not None}


def paired_rows(protocols: Sequence[Protocol], baseline: str, metric: str = "top1") -> list[PairedRow]:
    """For each protocol holding a group of method ``baseline``: every other group's paired
    difference (method - baseline) of ``metric`` (:func:`metric_words`, :data:`PAIRED_METRICS`)
    over the seeds both ran, with its :data:`~cilkit.analysis.significance.LEVEL` interval (paired
    t). A shot metric that no compared run records (no long-tailed protocol) is a ``UserError``."""
    if metric not in PAIRED_METRICS:
        raise UserError(f"--metric '{metric}': expected one of {', '.join(PAIRED_METRICS)}")
    methods = sorted({g.method for p in protocols for g in p.groups})
    if baseline not in methods:
        raise UserError(f"--baseline '{baseline}': no compared run is of that method (methods: {', '.join(methods)})")
    key, rows = PAIRED_METRICS[metric], []
    if "_shot_" in metric and not any(key in r.results for p in protocols for g in p.groups for r in g.runs):
        raise UserError(f"--metric '{metric}': no compared run records it (only a run with a long-tailed "
                        "scenario.imbalance.profile has many-, medium- and few-shot top-1)")
    for p in protocols:
        bases = [g for g in p.groups if g.method == baseline]
        if len(bases) > 1:
            raise UserError(f"--baseline '{baseline}': protocol {p.number} holds several groups of it "
                            f"({'; '.join(g.label for g in bases)}): compare them separately")
        if not bases:
            continue
        base = _by_seed(bases[0], key)
        for g in p.groups:
            if g is bases[0]:
                continue
            mine = _by_seed(g, key)
            shared = tuple(sorted(set(mine) & set(base)))
            rows.append(PairedRow(p.number, g.label, bases[0].label, shared,
                                  paired_interval([mine[s] for s in shared], [base[s] for s in shared]), metric))
    return rows


_PAIRED_HEADERS = ["method", "pairs", "seeds", "mean diff.", f"{LEVEL:.0%} CI", "verdict"]


def _paired_cells(row: PairedRow, baseline: str) -> list[str]:
    i = row.interval
    ci = "-" if i.low is None or i.high is None else f"[{i.low:.2f}, {i.high:.2f}]"
    mean = "-" if i.mean is None else f"{i.mean:+.2f}"
    return [row.label, str(i.pairs), seeds_text(row.seeds) or "-", mean, ci, i.verdict(baseline)]


def paired_note(baseline: str, metric: str = "top1") -> str:
    return (f"Paired difference from {baseline} (method − {baseline}) of the {metric_words(metric)}, "
            f"over the seeds both ran; {LEVEL:.0%} confidence interval of the mean "
            "difference from Student's t with pairs − 1 degrees of freedom. Verdict: better / worse when "
            "the interval excludes 0.")


def paired_markdown(protocols: Sequence[Protocol], rows: Sequence[PairedRow], baseline: str,
                    metric: str = "top1") -> str:
    """The paired comparison in Markdown: a note, then a table per protocol."""
    parts = [paired_note(baseline, metric)]
    for p in protocols:
        mine = [_paired_cells(r, baseline) for r in rows if r.protocol == p.number]
        head = f"Protocol {p.number}:" if len(protocols) > 1 else ""
        if not mine:
            parts.append(f"{head or 'No paired comparison:'} no other method beside a run of {baseline}."
                         if any(g.method == baseline for g in p.groups) else f"{head} no run of {baseline}.")
        else:
            parts.append("\n\n".join(filter(None, [head, markdown_table(_PAIRED_HEADERS, mine)])))
    return "\n\n".join(parts)


def paired_html(protocols: Sequence[Protocol], rows: Sequence[PairedRow], baseline: str, metric: str = "top1") -> str:
    """The paired comparison in HTML: a table per protocol, then the note."""
    parts = []
    for p in protocols:
        mine = [_paired_cells(r, baseline) for r in rows if r.protocol == p.number]
        if len(protocols) > 1:
            parts.append(f"<h3>Protocol {p.number}</h3>")
        parts.append(html_table(_PAIRED_HEADERS, mine) if mine else
                     f"<p>No paired comparison (no run of {html.escape(baseline)} or no other method).</p>")
    return "\n".join(parts) + f'\n<p class="note">{html.escape(paired_note(baseline, metric))}</p>'


def paired_csv(rows: Sequence[PairedRow]) -> str:
    """The paired comparison as CSV (full precision)."""
    buf = _text_io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["protocol", "method", "baseline", "metric", "pairs", "seeds", "mean_difference",
                f"ci{LEVEL * 100:.0f}_low", f"ci{LEVEL * 100:.0f}_high", "verdict"])
    for r in rows:
        i = r.interval
        w.writerow([r.protocol, r.label, r.baseline, PAIRED_METRICS[r.metric], i.pairs, " ".join(map(str, r.seeds)),
                    *("" if v is None else v for v in (i.mean, i.low, i.high)), i.verdict(r.baseline)])
    return buf.getvalue()
