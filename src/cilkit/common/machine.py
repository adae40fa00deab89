"""Facts of the machine a run is on that a config's sizes are checked against."""

from __future__ import annotations

import os


def physical_memory() -> int | None:
    """The machine's physical memory in bytes, or None where ``os.sysconf`` cannot tell (Windows)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory (:func:`peak_rss`) again from what it holds now,
    so that the peak of one run of a process that makes several is its own (Linux: ``5`` into
    ``/proc/self/clear_refs``). False where it cannot: the peak then counts from the process's start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """The most resident memory this process has held, in bytes (since :func:`reset_peak_rss`
    where it worked): ``VmHWM`` on Linux, ``ru_maxrss`` elsewhere; None where neither tells."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere
    except (ImportError, OSError):
        return None
