"""``cilkit reproduce``: a paper config over N seeds, and ``--list``, the paper configs with their
targets and the compute each needs.

A *paper config* is a packaged config of a paper's protocol: it carries the paper's figure under
``paper:`` (:class:`~cilkit.settings.paper.PaperTarget`), or the comment line ``# paper: no
figure reported ...`` where none was found. ``cilkit reproduce`` runs one through ``cilkit
run``'s own path (``runs: N`` seeds from its ``seed``, ``--jobs``/``--executor``, the report in
``<out>/report`` beside the paper's figure); this module says which configs qualify, how many
seeds by default, and what they cost.

The cost (:func:`images_per_seed`) is counted without the data: the images that go through a
training step over one seed's schedule, from the dataset's published size
(:mod:`cilkit.data.nominal`; its imbalance profile applied, ``scenario.val_per_class`` held
out), the scenario's states and the memory budget (``memory.total`` re-balanced over the seen
classes, or ``memory.per_class``, never more than a class's images). The stages counted:

* every method, state ``b``: ``epochs_of(b)`` x (the new classes' images + the exemplars of the
  old classes), the rules below aside;
* LUCIR ``cbf``, PODNet ``finetune``, EEIL's balanced finetuning (states b >= 1): their epochs
  x the memory after the state's update (every seen class's exemplars); SIR: its base's stages;
* BiC: its training set without the validation images (each new class less its hold-out
  ``h_b``, each old class its share less ``v_b``), and its bias stage's validation images
  (``v_b`` per seen class) once: the stage's ``bias_epochs`` run over their stored logits;
* SS-IL (b >= 1): the new images and ``replay_per_batch`` exemplars in each full batch;
* GDumb: the memory alone (every seen class's share), from scratch in every state;
* active (b >= 1): in each of the ``cycles``, the exemplars and the images annotated so far;
* joint: every image of every seen class.

Not counted: the passes without a backward (evaluation, herding's features, a teacher's
outputs), the rebalancing of a plugin method (its states count as the first rule).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cilkit.cil.budgets import annotation_budget, cycle_budgets, validation_size
from cilkit.cil.memory import class_quotas
from cilkit.cil.scenario import class_order, imbalance_counts
from cilkit.common.errors import UserError, unknown_name
from cilkit.data.nominal import nominal_size
from cilkit.rundir.layout import RunLayout
from cilkit.settings.config import RunConfig, load_config, read_yaml
from cilkit.settings.packaged import packaged_names, resolve_config
from cilkit.settings.registry import METHODS

DEFAULT_SEEDS = 3
LIST_HINT = "cilkit reproduce --list lists those with targets"
_NO_FIGURE = re.compile(r"^#\s*paper:", re.MULTILINE)  # "# paper: no figure reported ... was found"
_PAPER_KEY = re.compile(r"^paper:", re.MULTILINE)


# ----- which configs -------------------------------------------------------------------------
def is_paper_config(text: str) -> bool:
    """Whether a config's YAML text is a paper's protocol: a ``paper:`` block, or the comment
    line that says no figure of the paper was found."""
    return bool(_PAPER_KEY.search(text) or _NO_FIGURE.search(text))


def paper_config_names() -> list[str]:
    """The packaged paper configs, sorted."""
    return [name for name in packaged_names()
            if is_paper_config(resolve_config(name).read_text(encoding="utf-8"))]


def paper_config_path(value: str) -> Path:
    """Where ``cilkit reproduce NAME`` points: a file as given, else a packaged config of that
    name (one without a figure is refused by :func:`require_paper`); any other name is one line
    listing the paper configs."""
    path = Path(value)
    if path.exists() or len(path.parts) != 1:
        return path
    name = path.name.removesuffix(".yaml")
    if name not in packaged_names():
        raise UserError(unknown_name("paper config", name, paper_config_names()))
    return resolve_config(name)


def require_paper(config: RunConfig, label: str, path: Path) -> None:
    """Refuse, in one line, a config that holds no paper's figure to compare with (with the
    reason its ``# paper:`` comment gives, where it has one)."""
    if config.paper is not None:
        return
    text = path.read_text(encoding="utf-8")
    found = _NO_FIGURE.search(text)
    why = (": " + text[found.end():].splitlines()[0].strip() if found
           else " (the figure its paper reports), so there is nothing to reproduce")
    raise UserError(f"config '{label}' has no 'paper:' target{why}; {LIST_HINT}")


def check_resumable(run_dir: Path, name: str | None) -> None:
    """``--resume``: ``run_dir`` holds a reproduction (a run of a config with a ``paper:``
    target), of config ``name`` when one is given. A directory without a run's config.yaml is
    left to the resume to report."""
    recorded = RunLayout(run_dir).config
    if not recorded.is_file():
        return
    data = read_yaml(recorded)
    if data.get("paper") is None:
        raise UserError(f"--resume: '{run_dir}' holds a run without a 'paper:' target; continue it with cilkit run "
                        f"--resume {run_dir}")
    if name is not None and load_config(paper_config_path(name)).name != data.get("name"):
        raise UserError(f"--resume: '{run_dir}' holds a reproduction of '{data.get('name')}', not of '{name}'")


def default_seeds(config: RunConfig) -> int:
    """``--seeds`` unset: as many runs as the paper averaged (else the config's ``runs`` when it
    asks for several), at least 3: fewer give no interval to judge the paper's figure by."""
    if config.paper is not None and config.paper.paper_runs:
        return max(config.paper.paper_runs, DEFAULT_SEEDS)
    return max(config.runs, DEFAULT_SEEDS)


# ----- the listing ---------------------------------------------------------------------------
def target_text(config: RunConfig) -> str:
    """``63.42 (average incremental top-1 (CNN, first state included))``, or ``no target``."""
    if config.paper is None:
        return "no target"
    return f"{config.paper.summary():.2f} ({config.paper.reading()})"


def compute_text(config: RunConfig, seeds: int) -> str:
    """``9.12M images/seed, 27.36M for 3 seeds``, or why it is not known."""
    per_seed = images_per_seed(config)
    if per_seed is None:
        return f"images: unknown (no published size of data.name '{config.data.name}')"
    return f"{per_seed / 1e6:.2f}M images/seed, {per_seed * seeds / 1e6:.2f}M for {seeds} seed{'s' * (seeds > 1)}"


def paper_listing() -> str:
    """One line per packaged paper config: name, method, target, compute (``--list``)."""
    rows = []
    for name in paper_config_names():
        config = load_config(name)
        rows.append((name, ",".join(config.method_names), target_text(config),
                     compute_text(config, default_seeds(config))))
    widths = [max((len(row[k]) for row in rows), default=0) for k in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    return "\n".join([*lines, "", "cilkit reproduce NAME --set data.root=DIR [--seeds N] runs one, with the "
                      "paper's figure beside the run's in <out>/report"])


# ----- the compute estimate ------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """What the estimate reads of one method's config: each class position's training images,
    the states' class ends and the memory budget."""

    config: RunConfig
    per_class: list[int]
    ends: list[int]

    @property
    def states(self) -> range:
        return range(len(self.ends))

    def epochs(self, b: int) -> int:
        return self.config.train.epochs_of(b)

    def old(self, b: int) -> int:
        """Classes seen before state ``b``."""
        return self.ends[b - 1] if b > 0 else 0

    def new_images(self, b: int) -> int:
        return sum(self.per_class[self.old(b):self.ends[b]])

    def shares(self, n_classes: int, available: list[int] | None = None) -> list[int]:
        """Exemplars of each of the first ``n_classes`` classes: the budget's quota, at most
        the class's ``available`` images (default: its training images)."""
        have = available if available is not None else self.per_class
        mem = self.config.memory
        return [min(q, a) for q, a in zip(class_quotas(mem.total, mem.per_class, n_classes), have)]

    def memory(self, n_classes: int, available: list[int] | None = None) -> int:
        return sum(self.shares(n_classes, available))

    def trained(self, b: int) -> int:
        """The default training set of state ``b``: new images + the old classes' exemplars."""
        return self.epochs(b) * (self.new_images(b) + self.memory(self.old(b)))


def schedule_of(config: RunConfig) -> Schedule | None:
    """The schedule of a single-method config from the dataset's published size (None: unknown)."""
    size = nominal_size(config)
    if size is None:
        return None
    sc = config.scenario
    available = len(class_order(sc.order, size.classes))
    states = sc.states if sc.states is not None else 1 + max(0, (available - sc.initial) // sc.increment)
    ends = [sc.initial + sc.increment * b for b in range(states)]
    seed = sc.imbalance.seed if sc.imbalance.seed is not None else config.seed
    order = class_order(sc.order, size.classes)
    kept = imbalance_counts(sc.imbalance, torch.full((ends[-1],), size.train_per_class, dtype=torch.int64), seed,
                            order)
    return Schedule(config, [max(0, int(n) - sc.val_per_class) for n in kept], ends)


Stages = dict[str, int]
Estimator = Callable[[Schedule, Any], Stages]


def images_per_seed(config: RunConfig) -> int | None:
    """Training images one seed of ``config`` processes, every method summed (None: the
    dataset's size is not known without its data). The stages counted: the module docstring."""
    total = 0
    for name in config.method_names:
        stages = stages_of(config.for_method(name))
        if stages is None:
            return None
        total += sum(stages.values())
    return total


def stages_of(config: RunConfig) -> Stages | None:
    """``{stage: images}`` of one method's config (one seed)."""
    schedule = schedule_of(config)
    if schedule is None:
        return None
    return estimate(schedule, str(config.method))


def estimate(s: Schedule, method: str) -> Stages:
    return ESTIMATORS.get(method, _plain)(s, options(s.config, method))


def options(config: RunConfig, method: str) -> Any:
    """A method's options as its config model (its defaults where the config sets none)."""
    return METHODS[method].Config.model_validate(config.method_options(method))


def _plain(s: Schedule, o: Any) -> Stages:
    return {"training": sum(s.trained(b) for b in s.states)}


def _finetuned(s: Schedule, epochs: int) -> int:
    """A stage of ``epochs`` over every seen class's exemplars after each state b >= 1."""
    return sum(epochs * s.memory(s.ends[b]) for b in s.states if b > 0)


def _lucir(s: Schedule, o: Any) -> Stages:
    return {**_plain(s, o), "class-balanced finetuning": _finetuned(s, o.cbf_epochs) if o.cbf else 0}


def _podnet(s: Schedule, o: Any) -> Stages:
    return {**_plain(s, o), "class-balanced finetuning": _finetuned(s, o.finetune_epochs) if o.finetune else 0}


def _eeil(s: Schedule, o: Any) -> Stages:
    return {**_plain(s, o), "balanced finetuning": _finetuned(s, o.finetune_epochs)}


def _sir(s: Schedule, o: Any) -> Stages:
    return estimate(s, o.base)


def _lt2stage(s: Schedule, o: Any) -> Stages:
    """The base's stages, then in every state ``epochs`` class-aware epochs over the state's
    training set (the new images and the old classes' exemplars)."""
    stage2 = sum(o.epochs * (s.new_images(b) + (s.memory(s.old(b)) if b > 0 else 0)) for b in s.states)
    return {**estimate(s, o.base), "two-stage rebalancing": stage2}


def _joint(s: Schedule, o: Any) -> Stages:
    return {"training": sum(s.epochs(b) * sum(s.per_class[:s.ends[b]]) for b in s.states)}


def _gdumb(s: Schedule, o: Any) -> Stages:
    return {"training": sum(s.epochs(b) * s.memory(s.ends[b]) for b in s.states)}


def _ssil(s: Schedule, o: Any) -> Stages:
    """State 0 a shuffle of its images; later, ``replay_per_batch`` exemplars in each full batch."""
    batch = s.config.train.batch_size
    replay = o.replay_per_batch or max(1, batch // 5)
    total = 0
    for b in s.states:
        new = s.new_images(b)
        replayed = (new // (batch - replay)) * replay if b > 0 and s.memory(s.old(b)) else 0
        total += s.epochs(b) * (new + replayed)
    return {"training": total}


def _bic(s: Schedule, o: Any) -> Stages:
    """Training without the validation images; the bias stage's images once (v_b per seen class)."""
    training = bias = 0
    for b in s.states:
        quotas = s.shares(s.ends[0] if b == 0 else s.old(b))
        v = validation_size(min(quotas), o.val_ratio) if quotas else 0  # state 0 holds out v_1
        new = s.new_images(b) - v * (s.ends[b] - s.old(b))
        old = sum(max(0, q - v) for q in quotas) if b > 0 else 0
        training += s.epochs(b) * (new + old)
        bias += v * s.ends[b] if b > 0 else 0
    return {"training": training, "bias stage": bias}


def _active(s: Schedule, o: Any) -> Stages:
    """State 0 in full; later, per cycle, the exemplars and the images annotated so far (the
    state's budget split into cycles as the method splits it: :mod:`cilkit.cil.budgets`)."""
    total = s.epochs(0) * s.new_images(0)
    annotated = list(s.per_class[:s.ends[0]])  # images of each class the memory may hold
    for b in s.states:
        if b == 0:
            continue
        pool = s.new_images(b)
        budget = annotation_budget(o.budget, pool)
        exemplars = s.memory(s.old(b), annotated)
        done = list(itertools.accumulate(cycle_budgets(budget, o.cycles, o.first_share)))
        total += sum(s.epochs(b) * (exemplars + n) for n in done)  # n: annotated after each cycle
        n_new = s.ends[b] - s.old(b)
        annotated += [budget // n_new] * n_new
    return {"training": total}


ESTIMATORS: dict[str, Estimator] = {
    "lucir": _lucir, "podnet": _podnet, "eeil": _eeil, "sir": _sir, "joint": _joint, "gdumb": _gdumb,
    "ssil": _ssil, "bic": _bic, "active": _active, "lt2stage": _lt2stage,
}
