"""Exclusive file locks that leave no file behind: an ``flock`` on a lock file that its holder
removes when it lets go (the run directory's ``.cilkit.lock``, a state-0 cache entry's
``<entry>.lock``).

Removing a lock file needs care: a process waiting on it would otherwise go on to hold the
lock of a file no name reaches any more while a third process creates, locks and holds a new
file of that name, and both would run. So the holder removes the file *while it still holds
the lock*, and whoever obtains a lock checks that the name still refers to the file it locked
(same device and inode) and, if not, tries again on the file now there.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def acquire(path: Path, wait: bool = True, on_wait: Callable[[], None] | None = None) -> IO[str]:
    """Open ``path`` (created if missing) and lock it exclusively; returns the open file, for
    :func:`release`. While another process holds it: ``BlockingIOError`` if not ``wait``, else
    ``on_wait()`` (once) and wait. An ``OSError`` when the file cannot be opened or locked."""
    waited = False
    while True:
        f = open(path, "a")
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise
                if on_wait is not None and not waited:
                    on_wait()
                waited = True
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            if _same_file(f, path):
                return f
        except BaseException:
            f.close()
            raise
        f.close()  # the holder before us removed it: lock the file now at ``path``


def release(f: IO[str], path: Path) -> None:
    """Remove ``path`` (still holding its lock, see the module's docstring), then unlock. A file
    that cannot be removed (a read-only folder) is left, unlocked: the next holder takes it."""
    try:
        if _same_file(f, path):
            os.unlink(path)
    except OSError:
        pass
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def _same_file(f: IO[str], path: Path) -> bool:
    """Whether ``path`` names the open file ``f`` (not a newer file of that name, nor nothing)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
