"""TensorBoard event files of a run (``log.tensorboard: true``), under ``<run>/tb/``.

Written from the lines of the run's history (:mod:`cilkit.run.history`), so that a resumed run
rebuilds exactly the events of an uninterrupted one (fresh files, into which
:func:`cilkit.run.store.replay` writes the finished states' lines again):

- per epoch, against a global epoch counter (1, 2, ... over every fit of the run):
  ``train/loss``, ``train/lr`` and each named loss term's mean, ``train/term/<name>``;
- per state, against the number of classes seen: ``state/top1``, ``state/top1_old`` (from
  state 2 on), ``state/top1_new``, ``state/balanced_top1``, and the accuracy matrix so far
  as the image ``state/accuracy_matrix``.

Only the process that writes the run directory writes events (cilkit runs one). The
``tensorboard`` package is optional (``pip install "cilkit[tensorboard]"``) and imported only
when asked for; :func:`require` turns its absence into one line naming the config key.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from cilkit.analysis import plots
from cilkit.common.errors import UserError, described

STATE_SCALARS = ("top1", "top1_old", "top1_new", "balanced_top1")


def require() -> None:
    """Fail with one line when ``log.tensorboard`` is set and the package is missing."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError('config key \'log.tensorboard\': needs the tensorboard package: '
                        'pip install "cilkit[tensorboard]"') from None
    except Exception as e:  # installed but broken (e.g. a protobuf version it cannot use)
        raise UserError(f"config key 'log.tensorboard': the tensorboard package cannot be imported "
                        f"({described(e)}); reinstall it: pip install \"cilkit[tensorboard]\"") from None


class TensorBoardLog:
    """A ``SummaryWriter`` on ``log_dir``, fed with history lines."""

    def __init__(self, log_dir: str | os.PathLike, fresh: bool = False) -> None:
        """``fresh``: remove earlier event files first (then the run's finished states are
        replayed into it: :attr:`empty`)."""
        require()
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(log_dir)
        if fresh and log_dir.is_dir():
            shutil.rmtree(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.empty = fresh  # holds none of the run's lines yet

    def epoch(self, line: dict[str, Any], step: int) -> None:
        """One epoch line of the history, the ``step``-th epoch of the run (1, 2, ...)."""
        self.writer.add_scalar("train/loss", line["loss"], step)
        self.writer.add_scalar("train/lr", line["lr"], step)
        for name, value in line.get("terms", {}).items():
            self.writer.add_scalar(f"train/term/{name}", value, step)

    def state(self, line: dict[str, Any], matrix: list[list[float | None]]) -> None:
        """One state line of the history and the accuracy matrix up to that state; flushed."""
        step = line["classes_seen"]
        for key in STATE_SCALARS:
            if line[key] is not None:
                self.writer.add_scalar(f"state/{key}", line[key], step)
        image = plots.rgb_array(plots.plot_accuracy_matrix(matrix))
        self.writer.add_image("state/accuracy_matrix", image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def add_report_figures(log_dir: str | os.PathLike, report_dir: str | os.PathLike) -> list[str]:
    """Every PNG figure of a written report as a TensorBoard image (tag ``report/<name>``) in
    ``log_dir``, replacing earlier report events there. Returns the tags."""
    import numpy as np
    from PIL import Image

    tags = []
    log = TensorBoardLog(log_dir, fresh=True)
    try:
        for png in sorted(Path(report_dir).glob("*.png")):
            with Image.open(png) as im:
                image = np.asarray(im.convert("RGB"))
            tag = f"report/{png.stem}"
            log.writer.add_image(tag, image, 0, dataformats="HWC")
            tags.append(tag)
    finally:
        log.close()
    return tags
