"""The runs a comparison reads, and how they group.

:func:`scan_runs` turns the directories named on the command line into runs, and the runs whose
training diverged (their ``diverged.json``, no results: listed, never tabulated); :func:`find_runs`
keeps the runs with results. :func:`group_runs`
sorts them by *protocol* (:func:`protocol_key`: everything in results.json and config.yaml that
shapes the numbers, but the seed and the method) and, within a protocol, puts the runs of one
method with one set of options and different seeds into one :class:`RunGroup`, which the report
shows as mean ± std over its seeds.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cilkit.settings.config import RunConfig
from cilkit.settings.overrides import method_label
from cilkit.settings.keys import Role, option_key, protocol_settings
from cilkit.settings.registry import METHODS
from cilkit.common.errors import UserError, divergence_text
from cilkit.common.io import path_inside
from cilkit.rundir.layout import RunLayout
from cilkit.rundir.readers import read_divergence, read_results


# ----- finding the runs ------------------------------------------------------------------------
@dataclass(frozen=True)
class FoundRun:
    """A run found by :func:`find_runs`: its label in tables, directory and results."""

    label: str
    path: Path
    results: dict[str, Any]


@dataclass(frozen=True)
class DivergedRun:
    """A run whose training went non-finite (:class:`~cilkit.common.errors.RunDiverged`): its
    directory and ``diverged.json``. It has no results: a comparison lists it, never as a row."""

    path: Path
    record: dict[str, Any]

    def line(self) -> str:
        """``wa, seed 1993: diverged in state 2, train epoch 1: the loss term 'kd' is nan (...)
        (runs/x/wa)``."""
        r = self.record
        seed = f", seed {r['seed']}" if r.get("seed") is not None else ""
        return f"{r.get('label') or r['method']}{seed}: diverged in {divergence_text(r)} ({self.path})"


def _has_run(d: Path) -> bool:
    """``d`` holds a run's results.json, or the record of a run that diverged instead."""
    layout = RunLayout(d)
    return layout.results.is_file() or layout.diverged.is_file()


def _listed_methods(parent: Path) -> list[str]:
    """The methods a comparison's config.yaml lists (``method: [a, b]``), in its order."""
    try:
        method = (yaml.safe_load(RunLayout(parent).config.read_text()) or {}).get("method")
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return [str(m) for m in method] if isinstance(method, list) else []


def _natural(path: Path) -> list[Any]:
    """Sort key putting ``run_2`` before ``run_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _runs_in(parent: Path) -> list[Path]:
    """The sub-directories of ``parent`` that hold a results.json or a diverged.json (``run_0``,
    ``run_1``, ...)."""
    return sorted((d for d in parent.iterdir() if d.is_dir() and _has_run(d)), key=_natural)


def _method_dirs(parent: Path) -> list[Path]:
    """The run directories under a comparison's parent: its config's methods first (each holds
    results.json, or one run per seed when the config set ``runs: R``), then any other
    sub-directory holding one, by name."""
    listed = [path_inside(parent, m, RunLayout(parent).config, f"method '{m}'")  # a name read from a file
              for m in _listed_methods(parent)]
    found: list[Path] = []
    for d in listed:
        if _has_run(d):
            found.append(d)
        elif d.is_dir() and (repeats := _runs_in(d)):
            found += repeats
        else:
            raise UserError(f"'{RunLayout(d).results}' not found (method '{d.name}' of "
                            f"'{RunLayout(parent).config}' has no finished state)")
    return found + [d for d in _runs_in(parent) if d not in listed]


def find_runs(dirs: Sequence[str | os.PathLike]) -> list[FoundRun]:
    """The runs with results of :func:`scan_runs` (a run that diverged has none); when every
    run named diverged, a ``UserError`` with the first one's line."""
    runs, diverged = scan_runs(dirs)
    if not runs and diverged:
        raise UserError(f"no results to read: the training of every run named diverged ({diverged[0].line()}"
                        + (f"; and {len(diverged) - 1} more" if len(diverged) > 1 else "") + ")")
    return runs


def scan_runs(dirs: Sequence[str | os.PathLike]) -> tuple[list[FoundRun], list[DivergedRun]]:
    """Each DIR is a run (it holds results.json, or diverged.json when its training diverged) or
    a parent of one run directory per method (or per method and seed). A run named twice is
    taken once. Returns the runs with results and those that diverged. Labels are the method
    names, made unique with the directory when two runs share one."""
    paths: list[Path] = []
    for d in map(Path, dirs):
        if _has_run(d):
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
    diverged = [DivergedRun(p, read_divergence(RunLayout(p).diverged)) for p in paths if RunLayout(p).diverged.is_file()]
    gone = {d.path for d in diverged}
    loaded = [(p, read_results(RunLayout(p).results)) for p in paths if p not in gone]
    names = [str(r.get("method", p.name)) for p, r in loaded]
    runs = [FoundRun(n if names.count(n) == 1 else f"{n} ({p})", p, r) for n, (p, r) in zip(names, loaded)]
    return runs, diverged


# ----- protocols and groups --------------------------------------------------------------------
def _source_dirs(run: FoundRun) -> list[Path]:
    """Where a ``cilkit calibrate`` output's source run may be: its recorded ``source``, an
    absolute path; a relative one (written by an older cilkit, relative to the directory
    calibrate ran in) is tried against the output's own directory and each directory above it
    (nearest first), and last against the working directory."""
    source = run.results.get("calibration", {}).get("source")
    if not isinstance(source, str) or not source:
        return []
    path = Path(source)
    if path.is_absolute():
        return [path]
    here = run.path.resolve()
    return [here / path] + [d / path for d in here.parents] + [path]


def run_config(run: FoundRun) -> dict[str, Any] | None:
    """The run's config.yaml (for a ``cilkit calibrate`` output: its source run's, see
    :func:`_source_dirs`); None when there is none or it cannot be read."""
    for d in [run.path] + _source_dirs(run):
        try:
            data = yaml.safe_load(RunLayout(d).config.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            return data
    return None


TRAIN = "train."  # the training settings, which ``regimes`` lets differ by method (docs/regimes.md)


def protocol_key(results: Mapping[str, Any], config: Mapping[str, Any] | None, regimes: bool = False) -> str:
    """What makes two runs comparable: dataset, class order and states (results.json), and every
    config setting that :mod:`cilkit.settings.keys` declares a protocol key (data, scenario, memory,
    model, training, precision): not the seed, the method and its options, how the run executed
    (device, threads, compile, ...) or keys that change no number. With ``regimes``, not the
    training settings either (``compare --regimes``: each method trained in its own regime)."""
    settings = None if config is None else _protocol_settings(config)
    if regimes and settings is not None:
        settings = {k: v for k, v in settings.items() if not k.startswith(TRAIN)}
    return json.dumps({"dataset": results.get("dataset"), "class_order": results.get("class_order"),
                       "state_ends": results.get("state_ends"), "config": settings}, sort_keys=True, default=str)


def train_settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run's training settings that are protocol keys (dotted, ``train.``...)."""
    return {} if config is None else {k: v for k, v in _protocol_settings(config).items() if k.startswith(TRAIN)}


def _protocol_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config's protocol keys (:mod:`cilkit.settings.keys`), with today's defaults for keys an
    older cilkit did not write (a run recorded before a key existed ran as its default)."""
    return protocol_settings(config, RunConfig().to_dict())


def _method_options(results: Mapping[str, Any], config: Mapping[str, Any] | None) -> str:
    """The options of the run's method (of its source method for a calibrated run) that shape
    its numbers: those it recorded, with the defaults of options an older cilkit did not write
    (for a registered method), and without those declared to change no number (``allow_memory``)."""
    source = str(results.get("calibration", {}).get("source_method") or results.get("method"))
    options = (config or {}).get(source)
    cls = METHODS.get(source)
    if cls is not None and isinstance(options, dict):
        try:
            options = cls.Config.model_validate(options).model_dump(mode="json")
        except ValidationError:  # options of another version of the method: as recorded
            pass
        options = {k: v for k, v in options.items() if option_key(f"{source}.{k}").role is not Role.NONE}
    return json.dumps(options, sort_keys=True)


def _seed(config: Mapping[str, Any] | None) -> int | None:
    seed = (config or {}).get("seed")
    return seed if isinstance(seed, int) else None


@dataclass(frozen=True)
class RunGroup:
    """The runs of one method, with the same options, on one protocol, one per seed. A group
    of several runs is shown as mean ± sample std over them."""

    label: str
    method: str
    protocol: int  # 1-based, in the order protocols are first met
    runs: tuple[FoundRun, ...]
    seeds: tuple[int | None, ...]

    @property
    def repeated(self) -> bool:
        return len(self.runs) > 1


@dataclass(frozen=True)
class Protocol:
    """Runs that share a protocol: its number, one run's results and config to describe it
    (every run of it shares what is described), and its groups in order."""

    number: int
    results: dict[str, Any]
    config: dict[str, Any] | None
    groups: tuple[RunGroup, ...]
    # compare --regimes: each group whose training settings differ from the first group's, with
    # those settings (label, {dotted key: value}); empty without --regimes
    regimes: tuple[tuple[str, dict[str, Any]], ...] = ()


def _split(runs: list[tuple[FoundRun, int | None]]) -> list[list[tuple[FoundRun, int | None]]]:
    """One group for runs of distinct known seeds; otherwise (a seed unknown or repeated: the
    same run copied, say) each run stands alone rather than being averaged with itself."""
    seeds = [s for _, s in runs]
    if None in seeds or len(set(seeds)) < len(seeds):
        return [[r] for r in runs]
    return [runs]


def _labels(groups: list[tuple[str, int, list[tuple[FoundRun, int | None]]]], several: bool,
            options: list[str]) -> list[str]:
    """The method's label (its name, or :func:`~cilkit.settings.config.method_label`'s ``lwf
    (with memory 200)``); with another group of that label, its protocol number when that tells
    them apart, else the options in which its twins differ (``lt2stage (base=eeil)``), else its
    (first) directory. ``options``: each group's method options (:func:`_method_options`)."""
    labels = []
    for i, (method, number, members) in enumerate(groups):
        twins = [n for m, n, _ in groups if m == method]
        if len(twins) == 1:
            labels.append(method)
        elif several and twins.count(number) == 1:
            labels.append(f"{method} (protocol {number})")
        else:
            same = [j for j, (m, n, _) in enumerate(groups) if m == method and n == number]
            differing = _differing_options([options[j] for j in same], options[i])
            labels.append(f"{method} ({differing})" if differing else f"{method} ({members[0][0].path})")
    return labels


def group_identity(method_options: str, train: Mapping[str, Any]) -> str:
    """What sets a group apart within its protocol, as one JSON mapping: the method's options
    (:func:`_method_options`) and, under ``--regimes``, its training settings (dotted ``train.``
    keys, which no option name shares), so that twins are labelled by whichever differs."""
    if not train:
        return method_options
    own = json.loads(method_options)
    if own is not None and not isinstance(own, dict):  # not a mapping: kept whole beside the settings
        return json.dumps({"options": own, **train}, sort_keys=True, default=str)
    return json.dumps({**(own or {}), **train}, sort_keys=True, default=str)


def _differing_options(twins: list[str], mine: str) -> str:
    """``key=value, ...`` of ``mine`` (a JSON mapping of options) over the keys whose values are
    not the same in every one of ``twins``; empty when none differ (or they are not mappings)."""
    try:
        decoded = [json.loads(t) for t in twins]
        own = json.loads(mine)
    except (TypeError, ValueError):
        return ""
    if not isinstance(own, dict) or not all(isinstance(d, dict) for d in decoded):
        return ""
    keys = sorted({k for d in decoded for k in d if len({json.dumps(x.get(k), sort_keys=True) for x in decoded}) > 1})
    return ", ".join(f"{k}={own.get(k)}" for k in keys)


def _method_name(run: FoundRun) -> str:
    """The method a run trained (its directory's name where results.json does not say)."""
    return str(run.results.get("method", run.path.name))


def group_runs(runs: Sequence[FoundRun], regimes: bool = False, lead: str | None = None) -> list[Protocol]:
    """The runs by protocol (in the order first met), each as groups of seeds of one method.
    With ``regimes`` the training settings are no protocol key but part of a group's identity
    (runs of one method in two regimes are two groups), and each protocol names the groups
    whose training differs from its first group's (:attr:`Protocol.regimes`). ``lead`` (compare's
    baseline): that method's runs are met first, so its row heads each table and the settings
    are said against its own, whatever order the directories were named in."""
    if lead is not None:
        runs = sorted(runs, key=lambda r: _method_name(r) != lead)  # stable
    protocols: dict[str, tuple[FoundRun, dict[str, Any] | None]] = {}
    buckets: dict[tuple[str, str, str, int], list[tuple[FoundRun, int | None]]] = {}
    named: dict[tuple[str, str, str, int], str] = {}  # bucket -> its label (lwf (with memory 200))
    trains: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for run in runs:
        config = run_config(run)
        key = protocol_key(run.results, config, regimes)
        protocols.setdefault(key, (run, config))
        method = _method_name(run)
        train = train_settings(config) if regimes else {}
        options = group_identity(_method_options(run.results, config), train)
        bucket = (key, method, options, len(run.results["states"]))
        trains.setdefault(bucket, train)
        buckets.setdefault(bucket, []).append((run, _seed(config)))
        named.setdefault(bucket, method_label(method, config))  # one protocol: one memory
    number = {key: i + 1 for i, key in enumerate(protocols)}
    raw = [(named[b], number[b[0]], members) for b, runs_ in buckets.items() for members in _split(runs_)]
    labels = _labels(raw, len(protocols) > 1, [b[2] for b, runs_ in buckets.items() for _ in _split(runs_)])
    methods = [b[1] for b, runs_ in buckets.items() for _ in _split(runs_)]
    groups = [RunGroup(label, method, n, tuple(r for r, _ in members), tuple(s for _, s in members))
              for label, method, (_, n, members) in zip(labels, methods, raw)]
    own = [trains[b] for b, runs_ in buckets.items() for _ in _split(runs_)]
    return [Protocol(number[key], first.results, config, tuple(g for g in groups if g.protocol == number[key]),
                     _differing_trains([(g, t) for g, t in zip(groups, own) if g.protocol == number[key]]))
            for key, (first, config) in protocols.items()]


def _differing_trains(groups: list[tuple[RunGroup, dict[str, Any]]]) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Each group whose training settings differ from the first group's, with the settings that
    differ (its own values)."""
    if not groups:
        return ()
    first = groups[0][1]
    out = []
    for group, train in groups[1:]:
        differing = {k: train.get(k) for k in sorted(train.keys() | first.keys()) if train.get(k) != first.get(k)}
        if differing:
            out.append((group.label, differing))
    return tuple(out)


def regimes_sentence(p: Protocol) -> str:
    """``compare --regimes``: the training settings in which each method's runs differ from the
    first row's (docs/regimes.md: each method in its authors' regime, scaled by one rule)."""
    if not p.regimes:
        return ""
    first = p.groups[0].label
    each = "; ".join(f"{label}: " + ", ".join(f"{k.removeprefix('train.')} {v}" for k, v in train.items())
                     for label, train in p.regimes)
    return f" Training differs by method (--regimes), from {first}'s: {each}."
