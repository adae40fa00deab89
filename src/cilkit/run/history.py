"""A run's training record, ``history.jsonl``: one JSON object per line, appended as it goes.

Two kinds of line, both with the 1-based ``state`` the console shows ("state 2/5")::

    {"kind": "epoch", "state", "round", "stage", "epoch", "loss", "lr", "images_per_second", "seconds"}
    {"kind": "state", "state", "classes_seen", "top1", "top1_old", "top1_new", "balanced_top1", "seconds"}

``round`` is 1-based (active IL trains several rounds per state); ``stage`` is ``"train"`` or a
method's own stage (LUCIR's ``"balanced finetuning"``); ``epoch`` is 1-based within its stage;
``lr`` is the first parameter group's, before the scheduler stepped. A state whose model came
from the state-0 cache trained no epoch here: it has its state line and no epoch line.

The file is append-only and flushed per line. A resume after state ``k`` first drops the lines
of later states (written by the interrupted attempt), so that a resumed run's history equals an
uninterrupted one's but for the timings (``seconds``, ``images_per_second``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cilkit.common import distributed, io
from cilkit.training.protocol import EpochRecord
from cilkit.common.errors import UserError

STATE_KEYS = ("classes_seen", "top1", "top1_old", "top1_new", "balanced_top1")
LINE_KEYS = {"epoch": ("round", "stage", "epoch", "loss", "lr"), "state": STATE_KEYS}  # what readers index


def epoch_line(state: int, round: int, record: EpochRecord) -> dict[str, Any]:
    """The line of one epoch of 0-based ``state`` and ``round``."""
    return {"kind": "epoch", "state": state + 1, "round": round + 1, "stage": record.stage, "epoch": record.epoch,
            "loss": record.loss, "lr": record.lr, "images_per_second": record.images_per_second,
            "seconds": record.seconds, "terms": dict(record.terms)}


def state_line(state: int, entry: dict[str, Any]) -> dict[str, Any]:
    """The line of finished 0-based ``state`` from its results entry."""
    return {"kind": "state", "state": state + 1, **{k: entry[k] for k in STATE_KEYS}, "seconds": entry["time_s"]}


def _well_formed(line: Any) -> bool:
    return (isinstance(line, dict) and isinstance(line.get("state"), int)
            and line.get("kind") in LINE_KEYS and all(k in line for k in LINE_KEYS[line["kind"]]))


class History:
    """``history.jsonl`` of one run."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, line: dict[str, Any]) -> None:
        """Append one line (written and flushed at once; rank 0 only)."""
        if not distributed.is_main():
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:
            raise UserError(f"cannot write '{self.path}': {e.strerror or e}") from None

    def lines(self) -> list[dict[str, Any]]:
        """Every well-formed line; a line cut short by a crash, or damaged, is skipped."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise UserError(f"cannot read '{self.path}': {e.strerror or e}") from None
        out = []
        for raw in text.splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if _well_formed(line):
                out.append(line)
        return out

    def keep_states(self, last: int) -> list[dict[str, Any]]:
        """Drop the lines of states after 0-based ``last`` (-1: all), rewriting the file
        atomically; returns the lines kept."""
        if not distributed.is_main():
            return []
        kept = [line for line in self.lines() if line["state"] <= last + 1]
        if self.path.exists():
            io.write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        return kept
