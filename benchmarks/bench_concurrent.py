"""Two cilkit runs started together on one machine, against one alone.

Runs the quickstart's iCaRL run (digits, state-0 cache off, default thread count) once alone,
then twice at the same time, ``--repeat`` times each, and prints the wall times and the ratio
of the concurrent runs' mean to the solo mean. ``--src`` picks the source tree to run (e.g. a
checkout of an older commit, to measure before/after a change); ``--env K=V`` adds environment
variables to both. Time it on an otherwise idle machine: anything else running skews both sides.

    python benchmarks/bench_concurrent.py                       # this checkout
    python benchmarks/bench_concurrent.py --src /path/to/old/src
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def command(out: Path) -> list[str]:
    return [sys.executable, "-m", "cilkit", "run", "--set", "method=icarl", "--set", "state0_cache=null",
            "--out", str(out)]


def start(src: Path, out: Path, env: dict[str, str]) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(src), **env}
    return subprocess.Popen(command(out), env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def timed(procs: list[subprocess.Popen], t0: float) -> list[float]:
    times = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"run failed ({p.returncode}): {err.decode()[-500:]}")
        times.append(time.perf_counter() - t0)
    return times


def measure(src: Path, env: dict[str, str], repeat: int) -> tuple[list[float], list[float]]:
    solo, pair = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(repeat):
            t0 = time.perf_counter()
            solo += timed([start(src, Path(tmp) / f"solo{k}", env)], t0)
            t0 = time.perf_counter()
            pair += timed([start(src, Path(tmp) / f"pair{k}{i}", env) for i in range(2)], t0)
    return solo, pair


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=SRC, help="source tree to run (default: this checkout's src)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment variable")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    solo, pair = measure(args.src, env, args.repeat)
    s, c = statistics.mean(solo), statistics.mean(pair)
    print(f"src {args.src} env {env or '-'} cores {len(os.sched_getaffinity(0))}")
    print(f"solo: {', '.join(f'{t:.1f}' for t in solo)} s (mean {s:.1f})")
    print(f"two together: {', '.join(f'{t:.1f}' for t in pair)} s (mean {c:.1f})")
    print(f"ratio concurrent / solo: {c / s:.2f}")


if __name__ == "__main__":
    main()
