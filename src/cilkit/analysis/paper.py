"""The paper's figure beside the run's: a paper config's ``paper:`` (:class:`~cilkit.settings.paper.PaperTarget`)
against the runs of its protocol.

For each group of runs (one method, several seeds: :class:`~cilkit.analysis.runsets.RunGroup`)
whose config carries a ``paper:`` block, :func:`paper_comparisons` reads each run's figure the
paper's way (:func:`run_figure`: the score set, top-1 or top-5, the mean over the states with
or without the first, or the last state's), and puts the mean over the seeds, its
:data:`~cilkit.analysis.significance.LEVEL` interval (Student's t) and the difference beside the
paper's figure, with a verdict: the paper's figure lies within the seeds' interval, or the runs
lie above or below it; one seed has no interval. It also says whether the runs still are the
paper's protocol: their config against the packaged config of the same name
(:func:`protocol_changes`, on the protocol keys of :mod:`cilkit.settings.keys` and the method's
options; the data's paths and how the run executed do not count).

``cilkit compare`` (and so ``cilkit run``, which prints its table) writes it into table.md
(:func:`paper_markdown`), report.html (:func:`paper_html`) and table.tex's caption
(:func:`paper_sentence`). Runs without a ``paper:`` get nothing.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml
from pydantic import ValidationError

from cilkit.analysis.runsets import Protocol, RunGroup, run_config
from cilkit.analysis.significance import LEVEL, mean_std, paired_interval
from cilkit.cil.metrics import mean_incremental
from cilkit.common.errors import UserError
from cilkit.settings.config import RunConfig, validate
from cilkit.settings.keys import Role, option_key, protocol_settings
from cilkit.settings.packaged import packaged_names
from cilkit.settings.paper import PaperTarget
from cilkit.settings.registry import METHODS

WITHIN = f"within the seeds' {LEVEL:.0%} interval"
ABOVE = "above"  # the runs' interval lies above the paper's figure
BELOW = "below"
ONE_SEED = "one seed: no interval"
PATH_KEYS = ("data.root", "data.train_list", "data.test_list")  # where the data is: not the protocol
_SHOWN_CHANGES = 4  # the protocol keys named in a line; the others counted


# ----- the run's figure, read the paper's way --------------------------------------------------
def primary_scores(results: Mapping[str, Any]) -> str:
    """The score set of a run's ``top1`` (results.json's ``primary_scores``; for a run recorded
    before it, its method class's ``primary_scores``, ``cnn`` by default)."""
    recorded = results.get("primary_scores")
    if isinstance(recorded, str):
        return recorded
    return str(getattr(METHODS.get(str(results.get("method"))), "primary_scores", "cnn"))


def _score_set(results: Mapping[str, Any], classifier: str) -> list[Mapping[str, Any]] | None:
    """Each state's figures of the score set ``classifier``: the states themselves when it is the
    run's primary one, else their ``variants[classifier]``; None when some state lacks it."""
    states = results["states"]
    if classifier == primary_scores(results):
        return list(states)
    sets = [s.get("variants", {}).get(classifier) for s in states]
    return None if not sets or any(s is None for s in sets) else sets


def why_no_figure(results: Mapping[str, Any], target: PaperTarget) -> str | None:
    """Why the run has no figure to put beside the paper's (no such score set, no top-5, no
    state), or None when it has one."""
    if not results.get("states"):
        return "the run has no finished state"
    accs = _score_set(results, target.classifier)
    if accs is None:
        return (f"the run has no '{target.classifier}' scores (its top-1 is '{primary_scores(results)}'; "
                f"other score sets: {', '.join(_variants(results)) or 'none'})")
    key = f"top{target.top}"
    if any(a.get(key) is None for a in accs):
        return f"the run has no {key} in every state"
    if target.state_accuracy == "mean_over_tasks":
        if target.classifier != primary_scores(results):
            return (f"a mean over tasks is read from the accuracy matrix, which holds the run's top-1 scores "
                    f"('{primary_scores(results)}'), not '{target.classifier}'")
        rows = results.get("accuracy_matrix") or []
        if len(rows) < len(accs) or any(not any(v is not None for v in row) for row in rows[:len(accs)]):
            return "the run has no accuracy per state's classes (accuracy_matrix) in every state"
    if target.metric == "average_incremental" and not target.include_first and len(accs) < 2:
        return "a mean without the first state needs two states or more"
    return None


def task_mean(row: Sequence[float | None]) -> float:
    """A state's accuracy as FACIL reports it (LT-CIL, DGR): the mean of the accuracies on each
    state's classes so far (a row of results.json's ``accuracy_matrix``), each state weighing the
    same whatever its number of classes."""
    known = [float(v) for v in row if v is not None]
    return sum(known) / len(known)


def _variants(results: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys(v for s in results["states"] for v in s.get("variants", {})))


def run_figure(results: Mapping[str, Any], target: PaperTarget) -> float | None:
    """The run's figure read as the paper's (``target``): its score set (``classifier``), top-1 or
    top-5, and the metric (the mean over the states, with or without the first, or the last
    state's); None when the run has none (:func:`why_no_figure` says why)."""
    if why_no_figure(results, target) is not None:
        return None
    accs = _score_set(results, target.classifier) or []
    if target.state_accuracy == "mean_over_tasks":
        values = [task_mean(row) for row in results["accuracy_matrix"][:len(accs)]]
    else:
        values = [float(a[f"top{target.top}"]) for a in accs]
    if target.metric == "last":
        return values[-1]
    return mean_incremental(values, skip_first=not target.include_first)


# ----- still the paper's protocol? ------------------------------------------------------------
def paper_config_name(config: Mapping[str, Any]) -> str:
    """The config's name without the method a run adds (``podnet-cifar100-b50-5steps/podnet``)."""
    return str(config.get("name") or "").split("/")[0]


def packaged_paper_config(name: str) -> dict[str, Any] | None:
    """The packaged config ``name`` as validated (every default filled), or None when no
    packaged config has that name."""
    if name not in packaged_names():
        return None
    text = resources.files("cilkit").joinpath("configs").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return validate(yaml.safe_load(text), f"packaged config '{name}'").to_dict()


def _options(config: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The method's options in ``config`` with its defaults filled, those that shape numbers."""
    cls = METHODS.get(method)
    given = config.get(method) or {}
    if cls is None or not isinstance(given, dict):
        return {}
    try:
        options = cls.Config.model_validate(given).model_dump(mode="json")
    except ValidationError:  # options of another version of the method: as recorded
        options = dict(given)
    return {f"{method}.{k}": v for k, v in options.items() if option_key(f"{method}.{k}").role is not Role.NONE}


def _shown(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def protocol_changes(run: Mapping[str, Any], paper: Mapping[str, Any]) -> list[str]:
    """The keys in which a run's config differs from the paper config, ``key: paper's → run's``:
    the method, the protocol keys (:func:`~cilkit.settings.keys.protocol_settings`, the data's
    paths excepted) and the method's options that shape numbers. Empty: the paper's protocol."""
    method, paper_method = str(run.get("method")), str(paper.get("method"))
    if method != paper_method:
        return [f"method: {paper_method} → {method}"]
    defaults = RunConfig().to_dict()
    theirs = protocol_settings(paper, defaults) | _options(paper, method)
    ours = protocol_settings(run, defaults) | _options(run, method)
    return [f"{k}: {_shown(theirs.get(k))} → {_shown(ours.get(k))}"
            for k in sorted(theirs.keys() | ours.keys()) if k not in PATH_KEYS and theirs.get(k) != ours.get(k)]


# ----- one group against the paper ------------------------------------------------------------
@dataclass(frozen=True)
class PaperComparison:
    """A group's figure (one per seed) against its config's paper target."""

    label: str
    target: PaperTarget
    seeds: tuple[int | None, ...]
    values: tuple[float, ...]  # the runs' figure, read the paper's way; empty when ``missing``
    missing: str | None  # why the runs have no figure (:func:`why_no_figure`)
    config_name: str
    changes: tuple[str, ...] | None  # keys changed from the paper config; None: no packaged config to check

    @property
    def mean(self) -> float | None:
        return mean_std(self.values)[0] if self.values else None

    @property
    def std(self) -> float | None:
        return mean_std(self.values)[1] if self.values else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The :data:`LEVEL` interval of the mean over the seeds (Student's t, seeds - 1 degrees
        of freedom): the paired interval of the values against 0; None for fewer than 2 seeds."""
        i = paired_interval(list(self.values), [0.0] * len(self.values))
        return None if i.low is None or i.high is None else (i.low, i.high)

    @property
    def difference(self) -> float | None:
        """The runs' mean minus the paper's figure."""
        return None if self.mean is None else self.mean - self.target.summary()

    def verdict(self) -> str:
        """:data:`WITHIN`, :data:`ABOVE` or :data:`BELOW` the paper's figure, or :data:`ONE_SEED`."""
        if self.missing is not None:
            return f"no figure: {self.missing}"
        interval = self.interval
        if interval is None:
            return ONE_SEED
        paper = self.target.summary()
        return ABOVE if interval[0] > paper else BELOW if interval[1] < paper else WITHIN

    def protocol_line(self) -> str:
        """``the paper's protocol``, ``no longer the paper's protocol (scenario.increment: 10 → 5)``,
        or that it could not be checked."""
        if self.changes is None:
            return f"protocol not checked (no packaged config '{self.config_name}')"
        if not self.changes:
            return f"the paper's protocol ({self.config_name})"
        shown = "; ".join(self.changes[:_SHOWN_CHANGES])
        more = f"; and {len(self.changes) - _SHOWN_CHANGES} more" if len(self.changes) > _SHOWN_CHANGES else ""
        return f"no longer the paper's protocol ({shown}{more})"

    def figure_text(self) -> str:
        """``63.90 ± 0.40`` over several seeds, ``63.90`` for one, ``-`` without a figure."""
        if self.mean is None:
            return "-"
        return f"{self.mean:.2f}" + ("" if self.std is None else f" ± {self.std:.2f}")


def _target(config: Mapping[str, Any] | None, where: str) -> PaperTarget | None:
    block = (config or {}).get("paper")
    if block is None:
        return None
    try:
        return PaperTarget.model_validate(block)
    except ValidationError as e:
        raise UserError(f"{where}: its 'paper' block is not a paper target ({e.errors()[0]['msg']}): "
                        "correct or remove it") from None


def compare_group(group: RunGroup) -> PaperComparison | None:
    """The group's :class:`PaperComparison`, or None when its config carries no ``paper:``."""
    config = run_config(group.runs[0])
    target = _target(config, f"the config of '{group.runs[0].path}'")
    if target is None or config is None:
        return None
    missing = next((why for r in group.runs if (why := why_no_figure(r.results, target)) is not None), None)
    values = () if missing else tuple(v for r in group.runs if (v := run_figure(r.results, target)) is not None)
    name = paper_config_name(config)
    paper = packaged_paper_config(name)
    changes = None if paper is None else tuple(protocol_changes(config, paper))
    return PaperComparison(group.label, target, group.seeds, values, missing, name, changes)


def paper_comparisons(protocol: Protocol) -> list[PaperComparison]:
    """The protocol's groups that carry a paper target, each against it."""
    return [c for g in protocol.groups if (c := compare_group(g)) is not None]


# ----- written out ----------------------------------------------------------------------------
HEADERS = ["method", "seeds", "cilkit", f"{LEVEL:.0%} interval", "paper", "difference", "verdict"]
LEGEND = (f"cilkit: the runs' figure read the paper's way, mean ± sample std over the seeds; {LEVEL:.0%} "
          "interval: of that mean (Student's t, seeds − 1 degrees of freedom); difference: cilkit − paper; "
          f"verdict: the paper's figure {WITHIN}, or the interval above / below it.")


def _by_target(comparisons: Sequence[PaperComparison]) -> list[list[PaperComparison]]:
    """The comparisons in groups of one target (in the order first met)."""
    out: dict[str, list[PaperComparison]] = {}
    for c in comparisons:
        out.setdefault(c.target.model_dump_json(), []).append(c)
    return list(out.values())


def _seeds(c: PaperComparison) -> str:
    return ", ".join("?" if s is None else str(s) for s in c.seeds)


def _cells(c: PaperComparison) -> list[str]:
    interval = c.interval
    shown = "-" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"
    diff = "-" if c.difference is None else f"{c.difference:+.2f}"
    return [c.label, _seeds(c), c.figure_text(), shown, c.target.figure(), diff, c.verdict()]


def _head(target: PaperTarget) -> str:
    return f"Paper: {target.cited()}, {target.reading()}: {target.figure()}."


def _details(target: PaperTarget) -> list[str]:
    """Source, note and the published reproductions, one line each."""
    lines = [f"Source: {target.source}."]
    if target.note:
        lines.append(f"Note: {target.note}")
    for r in target.reproductions:
        lines.append(f"Reproduced: {r.value:g} ({r.source}" + (f"; {r.note})" if r.note else ")"))
    return lines


def paper_markdown(comparisons: Sequence[PaperComparison]) -> str:
    """Each paper target with its groups in a table (:data:`HEADERS`), the legend, where the
    figure was read, and whether each group still is the paper's protocol; empty without any."""
    parts = []
    for same in _by_target(comparisons):
        rows = [_cells(c) for c in same]
        table = "\n".join(["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|",
                           *("| " + " | ".join(r) + " |" for r in rows)])
        protocol = [f"Protocol of {c.label}: {c.protocol_line()}." for c in same]
        notes = "\n".join(protocol + _details(same[0].target))
        parts.append("\n\n".join([_head(same[0].target), table, LEGEND, notes]))
    return "\n\n".join(parts)


def paper_html(comparisons: Sequence[PaperComparison]) -> str:
    """:func:`paper_markdown` as HTML (a table per paper target, then the notes)."""
    e = html.escape
    parts = []
    for same in _by_target(comparisons):
        head = "".join(f"<th>{e(h)}</th>" for h in HEADERS)
        body = "".join("<tr>" + "".join(f"<td{'' if i in (0, 1, 6) else ' class=num'}>{e(v)}</td>"
                                        for i, v in enumerate(_cells(c))) + "</tr>\n" for c in same)
        notes = "".join(f"<li>{e(line)}</li>" for line in
                        [f"Protocol of {c.label}: {c.protocol_line()}." for c in same] + _details(same[0].target))
        parts.append(f"<p>{e(_head(same[0].target))}</p>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}"
                     f"</tbody>\n</table>\n<p class=\"note\">{e(LEGEND)}</p>\n<ul class=\"note\">{notes}</ul>")
    return "\n".join(parts)


def paper_sentence(comparisons: Sequence[PaperComparison]) -> str:
    """One sentence per paper target for a caption (table.tex): the paper's figure, each
    group's beside it with the difference and the verdict; empty without any."""
    out = []
    for same in _by_target(comparisons):
        t = same[0].target
        groups = []
        for c in same:
            seeds = f" over {len(c.values)} seeds" if len(c.values) > 1 else ""
            diff = "" if c.difference is None else f", difference {c.difference:+.2f}"
            changed = f"; {c.protocol_line()}" if c.changes else ""
            groups.append(f"{c.label} {c.figure_text()}{seeds}{diff}, {c.verdict()}{changed}")
        out.append(f"Paper: {t.title} ({t.venue}, {t.table}), {t.reading()}: {t.figure()}; " + "; ".join(groups) + ".")
    return " ".join(out)
