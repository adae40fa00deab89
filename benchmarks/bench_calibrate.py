"""Time ``cilkit calibrate`` in-process (no Python or torch start-up) on a finished run.

    python benchmarks/bench_calibrate.py RUN_DIR [--with il2m scaling none] [--repeat 10]

Each rectifier: one untimed warm-up call, then ``--repeat`` timed calls of
:func:`cilkit.analysis.calibrate.calibrate_run` (read scores and statistics, rectify every state,
recompute the metrics, write results.json and the scores) into a temporary directory; prints the
median and the fastest wall time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from cilkit.analysis.calibrate import calibrate_run
from cilkit.cil.rectify import RECTIFIERS


def time_calibration(run_dir: Path, rectifier: str, repeat: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        calibrate_run(run_dir, rectifier, Path(tmp) / "warm-up", echo=False)
        times = []
        for k in range(repeat):
            t0 = time.perf_counter()
            calibrate_run(run_dir, rectifier, Path(tmp) / str(k), echo=False)
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--with", dest="rectifiers", nargs="+", default=list(RECTIFIERS), choices=RECTIFIERS)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    for r in args.rectifiers:
        times = time_calibration(args.run_dir, r, args.repeat)
        print(f"calibrate --with {r:<8} median {1000 * statistics.median(times):7.1f} ms   "
              f"min {1000 * min(times):7.1f} ms   ({args.repeat} runs, {args.run_dir})")


if __name__ == "__main__":
    main()
