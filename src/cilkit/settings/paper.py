"""A paper's reported figure, carried by the config of the protocol it was reported on.

A paper config (``configs/lucir-cifar100-b50-5steps.yaml``) holds, under ``paper:``, what its
paper reports for that protocol and how to read it: the metric (average incremental accuracy,
with or without the first state, or the last state's accuracy), the classifier the figure was
measured with (its score set: the network's ``cnn`` output, the nearest-mean ``nme``, or a
method's own, BiC's bias-corrected ``bic``), top-1 or top-5, the
value (and the paper's spread over its runs, when given), per state when the paper lists them,
and where each number was taken from. Peer toolkits' published reproductions sit beside it
(``reproductions``). ``cilkit run``/``compare``/``reproduce`` put the run's figure beside the
paper's (:mod:`cilkit.analysis.paper`). The key changes no number (:mod:`cilkit.settings.keys`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from cilkit.settings.options import StrictNumbers

Metric = Literal["average_incremental", "last"]


class Reproduction(StrictNumbers):
    """A published reproduction of the paper's figure (a peer toolkit's, or another paper's
    re-run), read the same way as the paper's figure unless its ``note`` says how it differs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    value: float = Field(ge=0, le=100)
    source: str = Field(min_length=1)  # repository + file (+ line), or the paper and its table
    note: str | None = None  # e.g. "another class order", "ResNet-18"


class PaperTarget(StrictNumbers):
    """The figure a paper reports for the protocol of its config (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    title: str = Field(min_length=1)
    venue: str = Field(min_length=1)  # "CVPR 2019"
    table: str = Field(min_length=1)  # "Table 1", "Fig. 5 (legend)"
    metric: Metric = "average_incremental"
    include_first: bool = True  # average_incremental: does the mean include the first state?
    # the score set the figure was measured with, as results.json names it: the primary ``top1``
    # of a method whose ``primary_scores`` it is, else ``variants[classifier]`` (cnn, nme, bic, ...)
    classifier: str = Field("cnn", pattern=r"^[a-z][a-z0-9_]*$")
    top: Literal[1, 5] = 1
    # a state's accuracy: over the test images of every seen class (cilkit's top1), or the mean of
    # the accuracies of each state's classes (FACIL's task-agnostic accuracy averaged over the
    # tasks, which LT-CIL and DGR report: a 5-class task weighs as much as the 50-class first one)
    state_accuracy: Literal["all_classes", "mean_over_tasks"] = "all_classes"
    value: float | None = Field(None, ge=0, le=100)  # the summary (mean over the paper's runs)
    std: float | None = Field(None, ge=0)  # the paper's spread over its runs
    paper_runs: int | None = Field(None, ge=1)  # how many runs (class orders, seeds) the paper averaged
    per_state: list[float] | None = None  # the accuracy after each state, where the paper lists it
    source: str = Field(min_length=1)  # where the value was read: the paper, or a transcription of it
    note: str | None = None  # what differs from cilkit's run of the config (class orders, augmentation ...)
    reproductions: list[Reproduction] = Field(default_factory=list)

    @model_validator(mode="after")
    def _a_figure(self) -> "PaperTarget":
        if self.state_accuracy == "mean_over_tasks" and self.top != 1:
            raise ValueError("state_accuracy 'mean_over_tasks' is a top-1 figure (set top: 1)")
        if self.value is None and not self.per_state:
            raise ValueError("a paper target needs a value or per_state")
        if self.per_state is not None and any(not 0 <= v <= 100 for v in self.per_state):
            raise ValueError("per_state values are accuracies in percent (0..100)")
        if (self.value is None and self.metric == "average_incremental" and not self.include_first
                and len(self.per_state or []) < 2):
            raise ValueError("a mean without the first state needs per_state of two states or more")
        return self

    def summary(self) -> float:
        """The paper's figure: ``value``, or the metric computed from ``per_state``."""
        if self.value is not None:
            return self.value
        states = self.per_state or []
        if self.metric == "last":
            return states[-1]
        kept = states if self.include_first else states[1:]
        return sum(kept) / len(kept)

    def reading(self) -> str:
        """How the figure reads: ``average incremental top-1 (CNN, first state included)``."""
        what = "average incremental" if self.metric == "average_incremental" else "last-state"
        first = "" if self.metric == "last" else (", first state included" if self.include_first
                                                  else ", first state excluded")
        tasks = " over tasks" if self.state_accuracy == "mean_over_tasks" else ""
        return f"{what} top-{self.top}{tasks} ({self.classifier.upper()}{first})"

    def cited(self) -> str:
        """Where the figure is: ``PODNet: ... (ECCV 2020, Table 1)``."""
        return f"{self.title} ({self.venue}, {self.table})"

    def figure(self) -> str:
        """The paper's figure as it reports it (two decimals at most): ``64.83 ± 0.98 over 3 runs``."""
        spread = f" ± {round(self.std, 2):g}" if self.std is not None else ""
        runs = f" over {self.paper_runs} run{'s' if self.paper_runs > 1 else ''}" if self.paper_runs else ""
        return f"{round(self.summary(), 2):g}{spread}{runs}"
