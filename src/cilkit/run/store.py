"""What a run writes and reads back: :class:`RunStore`.

results.json (its schema: :func:`empty_results`), the checkpoint after every state (with the
code version that ran it: a resume under other code is said, or refused with ``--strict``), the memory,
scores and class statistics of each state, a method's own records, provenance, and the fan-out
of the run's records to history.jsonl and its trackers (TensorBoard, Weights & Biases: a
:class:`Tracker` each). Only rank 0 writes; every rank reads a
checkpoint through rank 0 (:func:`cilkit.common.distributed.from_main`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cilkit.common import distributed, io
from cilkit.settings.config import RunConfig
from cilkit.training.protocol import EpochRecord
from cilkit.common.errors import UserError
from cilkit.settings.keys import config_differences
from cilkit.cil.metrics import run_summary
from cilkit.run import history, provenance, state0cache, tensorboard, wandb_log
from cilkit.rundir.layout import RUN_MARKER, STATE_ENTRIES, RunLayout, clear_run, mark_run, marked_config
from cilkit.rundir.readers import RESULTS_VERSION, read_stats
from cilkit.common.runlog import log
from cilkit.cil.scenario import Scenario


def empty_results(config: RunConfig, dataset_name: str, class_names: list[str], scenario: Scenario,
                  primary_scores: str, environment: dict[str, Any]) -> dict[str, Any]:
    """results.json before the first state: what the run is; ``states`` fills as it goes."""
    seen = scenario.order[: scenario.ends[-1]]
    return {
        "version": RESULTS_VERSION,
        "method": config.method,
        "dataset": dataset_name,
        "num_states": scenario.num_states,
        "class_order": seen,
        "class_names": [class_names[c] for c in seen],
        "state_ends": scenario.ends,
        "imbalance": scenario.imbalance,  # profile and kept images per class position
        "primary_scores": primary_scores,
        "states": [],
        "accuracy_matrix": [],
        "complete": False,
        "wall_time_s": 0.0,
        "provenance": provenance.started(environment),
    }


class Tracker(Protocol):
    """Where a run's history lines go besides history.jsonl, open while the states run."""

    empty: bool  # holds none of the run's lines yet: the finished states are replayed into it

    def epoch(self, line: dict[str, Any], step: int) -> None: ...  # the run's step-th epoch (1, 2, ...)

    def state(self, line: dict[str, Any], matrix: list[list[float | None]]) -> None: ...  # matrix up to it


def replay(tracker: Tracker, lines: list[dict[str, Any]], matrix: list[list[float | None]]) -> None:
    """History ``lines`` (a resumed run's finished states) into ``tracker``."""
    epochs = 0
    for line in lines:
        if line["kind"] == "epoch":
            epochs += 1
            tracker.epoch(line, epochs)
        elif line["kind"] == "state":
            tracker.state(line, matrix[: line["state"]])


@dataclass
class Restored:
    """What a checkpoint hands back to the run: the state it was written after and its parts."""

    state: int
    architecture: dict[str, Any]  # the model's shape (IncrementalNet.architecture), rebuilt before loading
    model: dict[str, Any]
    method: dict[str, Any]
    memory: dict[str, Any]
    statistics: dict[str, Any] | None
    results: dict[str, Any]
    # the fingerprint of the data the finished states ran on (cilkit.data.fingerprint; a bare
    # digest before the splits were kept; None: cilkit 0.1.0)
    data: str | dict[str, Any] | None


class RunStore:
    """The files of one run (``layout``) and the results it is building (``results``)."""

    def __init__(self, layout: RunLayout, config: RunConfig, results: dict[str, Any]) -> None:
        self.layout = layout
        self.config = config
        self.results = results
        self.history = history.History(layout.history)
        self.trackers: list[Tracker] = []  # open while the states run
        self.epochs = 0  # the run's epochs so far, over every fit
        self.code = state0cache.code_version(config.plugins)  # the code this process runs (checkpointed)

    # ----- records as the run goes ---------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self, start: int) -> Iterator[None]:
        """While the states from ``start`` on run: the history keeps the finished states only
        (an interrupted attempt's later lines go), and the trackers asked for stay open (rank 0):
        fresh TensorBoard event files (``log.tensorboard``) and the run's wandb run
        (``log.wandb``), each replaying the finished states unless it holds them already."""
        kept = self.history.keep_states(start - 1)
        self.epochs = sum(line["kind"] == "epoch" for line in kept)
        provenance.start_peak_memory()  # the run's own peak, also when a process makes several runs
        if not distributed.is_main():
            yield
            return
        with contextlib.ExitStack() as stack:
            self.trackers = self._open_trackers(stack)
            for tracker in self.trackers:
                if tracker.empty:
                    replay(tracker, kept, self.results["accuracy_matrix"])
            try:
                yield
            finally:
                self.trackers = []

    def _open_trackers(self, stack: contextlib.ExitStack) -> list[Tracker]:
        """The trackers the config asks for, each closed by ``stack``."""
        trackers: list[Tracker] = []
        if self.config.log.tensorboard:
            trackers.append(stack.enter_context(contextlib.closing(
                tensorboard.TensorBoardLog(self.layout.tb, fresh=True))))
        if self.config.log.wandb:
            trackers.append(stack.enter_context(wandb_log.WandbLog(self.layout.root, self.config, self.results)))
        return trackers

    def record_epoch(self, state: int, round: int, record: EpochRecord) -> None:
        line = history.epoch_line(state, round, record)
        self.history.append(line)
        self.epochs += 1
        for tracker in self.trackers:
            tracker.epoch(line, self.epochs)

    def record_state(self, entry: dict[str, Any], compiled: str) -> None:
        """A finished state into the results (and their summary), then a history line, written
        before its checkpoint (a resume after the previous state drops it again)."""
        r = self.results
        r["accuracy_matrix"].append(entry.pop("accuracy_per_state"))
        r["states"].append(entry)
        r["wall_time_s"] += entry["time_s"]
        r.update(run_summary(r["states"], r["accuracy_matrix"]))
        r["complete"] = len(r["states"]) == r["num_states"]
        if "provenance" in r:
            r["provenance"]["finished"] = provenance.now()
            r["provenance"]["compile"] = compiled
            r["provenance"] = provenance.with_state_code(provenance.with_peak_memory(r["provenance"]), self.code,
                                                         entry["state"])
        line = history.state_line(entry["state"], entry)
        self.history.append(line)
        for tracker in self.trackers:
            tracker.state(line, r["accuracy_matrix"])

    # ----- per-state files -----------------------------------------------------------------------
    def write_scores(self, b: int, arrays: dict[str, np.ndarray]) -> None:
        io.write_npz(self.layout.scores(b), **arrays)

    def write_statistics(self, b: int, stats: dict[str, Any]) -> None:
        io.write_json(self.layout.stats(b), stats)

    def save_state(self, b: int, checkpoint: dict[str, Any], memory_record: dict[str, Any],
                   method_name: str, method_files: dict[str, Any]) -> None:
        """After state ``b``: the method's own records, the memory, the checkpoint (older ones
        removed with ``keep_checkpoints: last``), then results.json (rank 0 only)."""
        if not distributed.is_main():
            return
        if method_files:
            io.write_json(self.layout.method_file(method_name, b), method_files)
        io.write_json(self.layout.memory(b), memory_record)
        io.write_torch(self.layout.checkpoint(b), {**checkpoint, "state": b, "code": self.code,
                                                   "results": json.dumps(self.results),
                                                   "config": json.dumps(self.config.to_dict())})
        if self.config.keep_checkpoints == "last":
            for state, old in self.layout.checkpoints():
                if state != b:
                    old.unlink()
        io.write_json(self.layout.results, self.results)

    # ----- start and resume ----------------------------------------------------------------------
    def start_fresh(self) -> int:
        """A new run: the marker, then config.yaml."""
        mark_run(self.layout.root, self.config.to_dict())
        io.write_yaml(self.layout.config, self.config.to_dict())
        return 0

    def restart(self, method_name: str) -> int:
        """A resume that found no checkpoint: refuse a config that differs from the one the run
        started from (its marker) as a checkpoint's would be refused, then clear every file the
        earlier attempt's states wrote and start fresh."""
        started = marked_config(self.layout.root)
        if started is not None:
            self._check_resume_config(started, self.layout.root / RUN_MARKER)
        if distributed.is_main():
            clear_run(self.layout.root, STATE_ENTRIES | {method_name})
        return self.start_fresh()

    def write_results(self) -> None:
        """results.json again (rank 0), e.g. rebuilt from the checkpoint on a resume."""
        if distributed.is_main():
            io.write_json(self.layout.results, self.results)

    def restore(self, environment: dict[str, Any]) -> Restored | None:
        """The last checkpoint, checked (config unchanged in what a resume keeps, results not
        from a newer cilkit) and its results adopted; None when there is none."""
        found = distributed.from_main(self._read_checkpoint)  # rank 0 reads, every rank restores
        if found is None:
            return None
        path, ckpt = found
        if "config" in ckpt:
            self._check_resume_config(json.loads(ckpt["config"]), path)
        if "code" in ckpt:  # a checkpoint written before checkpoints recorded their code has none
            self._check_resume_code(ckpt["code"], path)
        results = json.loads(ckpt["results"])
        version = results.get("version", 1)
        if version != RESULTS_VERSION:  # never one results.json of two layouts
            which = "a newer" if version > RESULTS_VERSION else "an older"
            raise UserError(f"checkpoint '{path}' was written by {which} cilkit (results version {version}; this "
                            f"one writes {RESULTS_VERSION}): finish the run with the cilkit that started it, or "
                            "start a new run")
        if "provenance" in results:
            ranks = results["provenance"].get("ranks", 1)
            if ranks != distributed.world_size():
                log(f"[{self.config.method}] warning: the finished states ran on {ranks} process(es), the rest runs "
                    f"on {distributed.world_size()}: the batches are split differently, so the remaining states' "
                    "numbers differ from an uninterrupted run")
            results["provenance"] = provenance.resumed(results["provenance"], environment)
        self.results = results
        b = int(ckpt["state"])
        statistics = (json.loads(ckpt["statistics"]) if "statistics" in ckpt  # checkpoints of cilkit <= 0.1.0:
                      else distributed.from_main(lambda: read_stats(self.layout.stats(b), b)))
        architecture = ckpt.get("architecture", {"num_classes": ckpt["num_classes"]})  # cilkit <= 0.1: the head only
        return Restored(b, architecture, ckpt["model"], ckpt["method"], ckpt["memory"], statistics, results,
                        ckpt.get("data"))

    def _read_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        ckpts = self.layout.checkpoints()
        if not ckpts:
            return None
        path = ckpts[-1][1]
        try:
            return path, io.load_torch(path)
        except Exception as e:  # a corrupt or foreign file
            raise UserError(f"checkpoint '{path}' cannot be read: {e.__class__.__name__}") from None

    def _check_resume_code(self, saved: dict[str, Any], path: Path) -> None:
        """A resume under other code (cilkit or a plugin edited since the checkpoint) than the
        finished states ran: one warning line naming what changed (the run goes on, and the
        provenance in results.json lists both versions with their states); refused under
        ``--strict`` (:func:`strict_resume`)."""
        changed = state0cache.code_changes(saved, self.code)
        if not changed:
            return
        what = " and ".join(changed)
        if os.environ.get(STRICT_RESUME) == "1":
            raise UserError(f"--resume --strict: {what} changed since checkpoint '{path}' was written: restore the "
                            "code the finished states ran, or resume without --strict to continue under the new code")
        log(f"[{self.config.method}] warning: --resume: {what} changed since the finished states ran: the remaining "
            "states run under the new code (results.json's provenance lists both; --strict refuses)")

    def _check_resume_config(self, saved: dict[str, Any], path: Path) -> None:
        """Refuse to resume when the run's config.yaml no longer says what the checkpoint was
        made with, in a key a resume must keep (:mod:`cilkit.settings.keys`)."""
        keys = config_differences(self.config.to_dict(), saved)
        if keys:
            shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
            raise UserError(f"--resume: '{self.layout.config}' differs from checkpoint '{path}' in {shown}: "
                            "restore those settings, or start a new run")


STRICT_RESUME = "CILKIT_STRICT_RESUME"
# ^ set while cilkit run --resume --strict runs (an environment variable: the jobs a resume
#   starts, local processes or SLURM jobs, inherit it): a resume under other code is refused


@contextlib.contextmanager
def strict_resume(strict: bool) -> Iterator[None]:
    """Inside the block, a resume under other code than its checkpoint's is refused (``strict``)
    rather than warned of."""
    if not strict:
        yield
        return
    os.environ[STRICT_RESUME] = "1"
    try:
        yield
    finally:
        os.environ.pop(STRICT_RESUME, None)


def tensors_of(obj: Any) -> list[Any]:
    """The tensors and plain values inside nested dicts and lists, in a fixed order."""
    if isinstance(obj, dict):
        return [v for k in sorted(obj, key=str) for v in tensors_of(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [v for item in obj for v in tensors_of(item)]
    return [obj]


def checkpoint_parts(model: torch.nn.Module, architecture: dict[str, Any], method_state: dict[str, Any],
                     memory_state: dict[str, Any], statistics: dict[str, Any] | None, data: dict[str, Any]) -> dict[str, Any]:
    """What a resume needs after a state, besides the results and config the store adds: the
    model and its architecture (its shape: rebuilt before the weights load), the method's and the memory's state, the class statistics (the history IL2M's next
    state reads), and the fingerprint of the data (a resume on other data is refused). No optimiser
    (every state, and every round, starts a fresh one) and no RNG state (every state re-seeds
    its generators from ``(seed, state)``)."""
    return {
        "data": data,
        "num_classes": architecture["num_classes"],
        "architecture": architecture,
        "model": model.state_dict(),
        "method": method_state,
        "memory": memory_state,
        "statistics": json.dumps(statistics),
    }
