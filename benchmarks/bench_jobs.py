"""Many runs at once (issue 24): one comparison serial (``threads: 2``) against ``--jobs 2``
(``threads: 1`` each), and, with ``--slurm``, ``--jobs 2`` against ``--executor slurm --jobs 2``
on the cluster ``bash .ci/slurm start`` brings up on this machine.

Every side is one ``cilkit run`` command (state-0 cache off, so that each side trains all its
runs), started one after another in this process and timed from start to exit; the wall times
and their ratio are printed with the commands. Time it on an otherwise idle machine.

    python benchmarks/bench_jobs.py                                     # sized for 2 CPU cores
    python benchmarks/bench_jobs.py --methods finetune,icarl,lucir,bic,il2m,sir,joint --runs 5 \\
        --set train.epochs=5 --set scenario.states=5                    # the full comparison (hours)
    python benchmarks/bench_jobs.py --slurm                             # + the scheduler's overhead
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = "finetune,icarl,lucir,bic,il2m,sir,joint"


def cilkit_run(config: str, methods: str, runs: int, sets: list[str], out: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "cilkit", "run", config, "--methods", methods, "--set", f"runs={runs}",
           "--set", "state0_cache=null", "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    return cmd + extra


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fashion-mnist.yaml")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--set", action="append", default=None, help="config overrides of every side "
                   "(default: train.epochs=1, scenario.states=2: sized for this 2-core machine)")
    p.add_argument("--slurm", action="store_true", help="also time --executor slurm --jobs 2 against --jobs 2")
    args = p.parse_args()
    sets = args.set if args.set is not None else ["train.epochs=1", "scenario.states=2"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sides = {
            "serial, threads 2": cilkit_run(args.config, args.methods, args.runs, sets + ["threads=2"], root / "serial", []),
            "--jobs 2, threads 1": cilkit_run(args.config, args.methods, args.runs, sets + ["threads=1"], root / "jobs",
                                              ["--jobs", "2"]),
        }
        if args.slurm:
            sides["--executor slurm --jobs 2, threads 1"] = cilkit_run(
                args.config, args.methods, args.runs, sets + ["threads=1"], root / "slurm",
                ["--jobs", "2", "--executor", "slurm", "--slurm-partition", "debug", "--slurm-cpus-per-job", "1"])
        times = {}
        for name, cmd in sides.items():
            times[name] = timed(cmd)
            print(f"{name}: {times[name]:.1f} s   ({' '.join(cmd[1:])})", flush=True)
    names = list(times)
    print(f"ratio serial / --jobs 2: {times[names[0]] / times[names[1]]:.2f}")
    if args.slurm:
        print(f"ratio slurm / --jobs 2: {times[names[2]] / times[names[1]]:.2f}")


if __name__ == "__main__":
    main()
