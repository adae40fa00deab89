"""Where a run's numbers come from: code, libraries, machine, settings that move the last
digits, the command and the times (``provenance`` in results.json); ``code``: the digests of
the cilkit package and the plugins that produced each state (two or more when a resume ran
under edited code).

Figures move between machines and thread counts (benchmarks/RESULTS.md shows one example), so
a results file says which it was made on.
"""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from cilkit.common import distributed, machine

import cilkit


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the checkout cilkit runs from (``+dirty`` with local changes); None when
    it is not installed from a git checkout."""
    root = Path(cilkit.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, threads: int, amp: bool, channels_last: bool) -> dict[str, Any]:
    """What a run's numbers depend on beyond its config."""
    return {
        "cilkit": cilkit.__version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "threads": threads,
        "precision": "bf16 autocast" if amp else "fp32",
        "memory_format": "channels_last" if channels_last else "contiguous",
        # data-parallel processes (torchrun) and their backend; 1 and None in one process
        "ranks": distributed.world_size(),
        "backend": distributed.backend(),
    }


_PEAK_SINCE = ["process"]  # where the peak memory counts from: "run" once start_peak_memory reset it


def start_peak_memory() -> None:
    """The run's peak memory (:func:`with_peak_memory`) counts from here: the process's peak
    resident memory starts again from what it holds now (the data and model included), and so
    does CUDA's peak allocation."""
    _PEAK_SINCE[0] = "run" if machine.reset_peak_rss() else "process"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def with_peak_memory(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the run's peak memory so far: ``peak_rss_bytes`` (the most resident memory
    of the process, since :func:`start_peak_memory`: ``peak_rss_since`` says run or process start)
    and, where CUDA ran, ``peak_cuda_bytes`` (the most memory its tensors held); on a resumed run
    the largest of every attempt. Rank 0's, under torchrun."""
    rss = machine.peak_rss()
    out = dict(record)
    if rss is not None:
        out["peak_rss_bytes"] = max(rss, int(record.get("peak_rss_bytes") or 0))
        out["peak_rss_since"] = _PEAK_SINCE[0]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_bytes"] = max(int(torch.cuda.max_memory_allocated()), int(record.get("peak_cuda_bytes") or 0))
    return out


def command_line() -> str:
    return shlex.join(["cilkit" if Path(sys.argv[0]).name in ("cilkit", "__main__.py") else sys.argv[0],
                       *sys.argv[1:]])


def started(env: dict[str, Any]) -> dict[str, Any]:
    """The provenance record of a fresh run."""
    return {**env, "command": command_line(), "started": now(), "finished": None, "resumed": []}


def with_state_code(record: dict[str, Any], code: dict[str, Any], state: int) -> dict[str, Any]:
    """``record`` with state ``state`` (its ``state`` index in results.json) produced by ``code``
    (:func:`cilkit.run.state0cache.code_version`): ``code`` lists every version of the code the
    run's states ran under, in order, each with its ``states``; a resume under other code adds
    one (an uninterrupted run has one)."""
    versions = list(record.get("code", []))
    if versions and {k: v for k, v in versions[-1].items() if k != "states"} == code:
        versions[-1] = {**versions[-1], "states": [*versions[-1]["states"], state]}
    else:
        versions.append({**code, "states": [state]})
    return {**record, "code": versions}


def resumed(record: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """The record of a resumed run: each resume adds its time, command and whatever of the
    environment differs from the start (another machine or library gives other last digits)."""
    changed = {k: v for k, v in env.items() if record.get(k) != v}
    return {**record, "resumed": [*record.get("resumed", []), {"at": now(), "command": command_line(), **changed}]}
