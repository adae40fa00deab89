"""The lines a run prints, and their copy in the run directory's ``run.log``.

:func:`log` prints a line; inside :func:`tee` it is also appended to the open log files
(append-only, flushed per line, so a killed run keeps every line it printed). Tees nest: the
parent directory of a comparison logs every line of its methods' runs, each of which logs its
own; a file already open is not opened twice. A job in a process of its own writes its own
run.log; the lines the parent forwards from it (its warnings) go through :func:`relay`. An
error that ends a block is written to the open log files too (:func:`record_failure`) as its
traceback, which the console shows as well; a user error only where the run records it (one
that ends a state), never a refusal to start.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from cilkit.common import distributed
from cilkit.common.errors import UserError

_files: dict[Path, TextIO] = {}  # the log files lines are copied to, by resolved path


def log(msg: str) -> None:
    """Print ``msg`` and append it to every log file open under :func:`tee` (under torchrun:
    rank 0 alone prints and writes)."""
    _emit(msg, None)


def relay(msg: str, source: str | os.PathLike) -> None:
    """:func:`log` a line that another process (a job of :mod:`cilkit.runs.jobs`) wrote to its
    own log file ``source``: printed and appended to every open log file but ``source`` itself,
    which has the line already (a single job's run directory is the parent's)."""
    _emit(msg, Path(source).resolve())


def _emit(msg: str, skip: Path | None) -> None:
    if not distributed.is_main():
        return
    print(msg, flush=True)
    for path, f in list(_files.items()):
        if path == skip:
            continue
        try:
            f.write(msg + "\n")
            f.flush()
        except OSError as e:  # full disk, quota, a file system gone: one line, not a traceback
            raise UserError(f"cannot write '{path}': {e.strerror or e}") from None


@contextlib.contextmanager
def tee(path: str | os.PathLike) -> Iterator[None]:
    """Append every :func:`log` line to ``path`` inside the block (its folder must exist)."""
    key = Path(path).resolve()
    if key in _files or not distributed.is_main():  # already copied to (a run inside a run_methods of the same directory)
        yield
        return
    try:
        f = open(key, "a", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write '{path}': {e.strerror or e}") from None
    _files[key] = f
    try:
        yield
    except Exception as e:
        if not isinstance(e, UserError):  # a refusal leaves the directory as it was: the console says it
            record_failure(e)
        raise
    finally:
        del _files[key]
        with contextlib.suppress(OSError):  # the write error, if any, was reported already
            f.close()


def record_failure(e: BaseException) -> None:
    """Append what ended a run to every open log file, once however many tees it leaves: a
    :class:`UserError` as the ``error:`` line the console prints, anything else as its full
    traceback (with its notes). Nothing is printed: the console shows the error itself."""
    if getattr(e, "_cilkit_logged", False) or not distributed.is_main():
        return
    text = f"error: {e}\n" if isinstance(e, UserError) else "".join(traceback.format_exception(e))
    for f in list(_files.values()):
        with contextlib.suppress(OSError):  # the log cannot hide the error being reported
            f.write(text)
            f.flush()
    with contextlib.suppress(AttributeError):
        e._cilkit_logged = True  # type: ignore[attr-defined]
