"""OpenMP's wait policy on one Fashion-MNIST run: spinning (ACTIVE) against sleeping (PASSIVE) idle
threads, for a run alone and for two runs sharing the cores (issue 40 item 10).

Each case starts fresh ``cilkit run`` processes of the same run (configs/fashion-mnist.yaml, one
method, the state-0 cache off) and reads their wall, user and system time (``os.wait4``):

- alone: one run with OMP_WAIT_POLICY=ACTIVE, one with PASSIVE, and one with the variable unset
  (cilkit chooses: its setup line says which and why);
- shared: two runs started together, both ACTIVE, then both PASSIVE (what --jobs 2 or a second
  run on the machine does to a run).

The cases alternate within each repeat (ACTIVE, PASSIVE, ... then the next repeat), so a drift of
the machine touches both policies alike. Time it on an otherwise idle machine. ``--futex`` adds
one run per policy under ``strace -f -c -e trace=futex`` (its own runs: strace slows them) for the
number of futex calls. ``--tiny`` is a seconds-long check that the script works (2 states, 1 epoch).

    python benchmarks/bench_omp_policy.py                      # 2 threads, 3 repeats
    python benchmarks/bench_omp_policy.py --threads 2 --repeat 5 --futex
    python benchmarks/bench_omp_policy.py --states 3 --epochs 2 --repeat 2 --shared-limit 240
    python benchmarks/bench_omp_policy.py --tiny --repeat 1    # does it run?
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONFIG = ROOT / "configs" / "fashion-mnist.yaml"
DATA = Path("/usr/share/datasets/fashion-mnist")
POLICY_ENV = ("OMP_WAIT_POLICY", "CILKIT_OMP_WAIT_POLICY", "CILKIT_CORES_SHARED")


@dataclass
class Timing:
    wall: float
    user: float
    sys: float
    first_line: str = ""


def command(args: argparse.Namespace, out: Path) -> list[str]:
    sets = [f"method={args.method}", f"threads={args.threads}", "state0_cache=null", f"data.root={args.data}"]
    if args.tiny:
        args.states, args.epochs = 2, 1
    if args.states is not None:
        sets.append(f"scenario.states={args.states}")
    if args.epochs is not None:  # the step of the lr is no cost: left out of a shortened run
        sets += [f"train.epochs={args.epochs}", "train.schedule.milestones=[]"]
    return [sys.executable, "-m", "cilkit", "run", str(CONFIG), *(x for s in sets for x in ("--set", s)),
            "--out", str(out)]


def environment(policy: str | None, machine_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_ENV}
    env.update({"PYTHONPATH": str(SRC), "CILKIT_MACHINE_DIR": str(machine_dir)})  # no other run's marker
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    return env


class CaseStopped(Exception):
    """A case still running at its time limit (its processes killed): a lower bound, not a time."""


def _read_back(f: IO[str]) -> str:
    f.seek(0)
    text = f.read()
    f.close()
    return text


def run_together(cmds: list[list[str]], envs: list[dict[str, str]], prefix: list[str] | None = None,
                 limit_s: float | None = None) -> list[Timing]:
    """Start every command at once; each one's wall time from the common start, its own CPU times.
    Past ``limit_s`` seconds every process still running is killed and :class:`CaseStopped` raised."""
    # output to files, read after exit: a pipe nobody reads while the process runs fills and blocks it
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in cmds]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*(prefix or []), *c], env=e, stdout=o, stderr=r, text=True)
             for c, e, (o, r) in zip(cmds, envs, files)]
    timings = []
    for p, outputs in zip(procs, files):
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if limit_s is not None and time.perf_counter() - t0 > limit_s:
                for q in procs:
                    q.kill()
                    q.wait()
                raise CaseStopped(f"stopped at {limit_s:.0f} s")
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out, err = (_read_back(f) for f in outputs)
        if p.returncode != 0:
            raise SystemExit(f"run failed ({p.returncode}): {err[-800:]}")
        first = next((line for line in out.splitlines() if "idle threads" in line), "")
        timings.append(Timing(wall, usage.ru_utime, usage.ru_stime, first))
        if prefix:  # strace -c writes its table on stderr
            timings[-1].first_line = err
    return timings


def summary(ts: list[Timing]) -> str:
    def ms(values: list[float]) -> str:
        return f"{statistics.mean(values):6.1f}" + (f" ± {statistics.stdev(values):4.1f}" if len(values) > 1 else "       ")
    return (f"wall {ms([t.wall for t in ts])} s   user {ms([t.user for t in ts])} s   "
            f"system {ms([t.sys for t in ts])} s   (n={len(ts)})")


def futex_calls(strace_table: str) -> str:
    m = re.search(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*futex\s*$", strace_table, re.M)
    return m.group(1) if m else "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="finetune")
    p.add_argument("--threads", type=int, default=2, help="each run's thread count (default 2)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--data", type=Path, default=DATA, help=f"Fashion-MNIST folder (default {DATA})")
    p.add_argument("--tiny", action="store_true", help="2 states of 1 epoch: check that the script runs")
    p.add_argument("--states", type=int, help="a shorter run for every case: its first N states")
    p.add_argument("--epochs", type=int, help="a shorter run for every case: E epochs per state (no lr step)")
    p.add_argument("--no-shared", action="store_true", help="the run alone only")
    p.add_argument("--shared-limit", type=float, metavar="S", help="stop a shared case still running after S "
                   "seconds (reported as a lower bound; not started again in later repeats)")
    p.add_argument("--futex", action="store_true", help="also count futex calls per policy (strace)")
    args = p.parse_args()
    if not (args.data / "train-images-idx3-ubyte.gz").exists() and not (args.data / "train-images-idx3-ubyte").exists():
        raise SystemExit(f"no Fashion-MNIST in {args.data} (apt-get install -y dataset-fashion-mnist)")
    cores = len(os.sched_getaffinity(0))
    alone: dict[str, list[Timing]] = {"ACTIVE": [], "PASSIVE": [], "unset": []}
    shared: dict[str, list[Timing]] = {"ACTIVE": [], "PASSIVE": []}
    stopped: dict[str, str] = {}  # shared cases stopped at --shared-limit
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        k = 0

        def fresh() -> Path:
            nonlocal k
            k += 1
            return tmp / f"run{k}"

        for _ in range(args.repeat):
            for policy in ("ACTIVE", "PASSIVE", "unset"):
                env = environment(None if policy == "unset" else policy, tmp / "machine")
                alone[policy] += run_together([command(args, fresh())], [env])
                print(f"[done] alone  {policy:8s} {summary(alone[policy][-1:])}", flush=True)  # kept if killed later
            if not args.no_shared:
                for policy in ("ACTIVE", "PASSIVE"):
                    if policy in stopped:
                        continue  # stopped at the limit once: not started again
                    env = environment(policy, tmp / "machine")
                    try:
                        shared[policy] += run_together([command(args, fresh()), command(args, fresh())], [env, env],
                                                       limit_s=args.shared_limit)
                    except CaseStopped as e:
                        stopped[policy] = str(e)
                        print(f"[stopped] shared {policy:8s} {e}: not finished", flush=True)
                        continue
                    print(f"[done] shared {policy:8s} {summary(shared[policy][-2:])}", flush=True)
            shutil.rmtree(tmp / "machine", ignore_errors=True)
        futex: dict[str, str] = {}
        if args.futex:
            if shutil.which("strace") is None:
                raise SystemExit("--futex needs strace (apt-get install -y strace)")
            for policy in ("ACTIVE", "PASSIVE"):
                (t,) = run_together([command(args, fresh())], [environment(policy, tmp / "machine")],
                                    prefix=["strace", "-f", "-c", "-e", "trace=futex"])
                futex[policy] = futex_calls(t.first_line)
    what = "configs/fashion-mnist.yaml" + "".join(
        f", {label} {v}" for label, v in (("states", args.states), ("epochs per state", args.epochs)) if v is not None)
    print(f"Fashion-MNIST {args.method}, {what}, threads {args.threads}, {cores} cores, {args.repeat} repeat(s)")
    for policy, ts in alone.items():
        print(f"alone   OMP_WAIT_POLICY={policy:8s} {summary(ts)}")
    if alone["unset"]:
        print(f"        unset: cilkit chose: {alone['unset'][0].first_line.split('; device ')[-1].split(', fp32')[0]}")
    a, s = (statistics.mean(t.wall for t in alone[x]) for x in ("ACTIVE", "PASSIVE"))
    print(f"alone:  ACTIVE / PASSIVE wall = {a / s:.2f}")
    if not args.no_shared:
        for policy, ts in shared.items():
            if ts:
                print(f"shared  OMP_WAIT_POLICY={policy:8s} {summary(ts)}  (two runs together, each)")
            if policy in stopped:
                print(f"shared  OMP_WAIT_POLICY={policy:8s} {stopped[policy]} (--shared-limit), not finished")
        if shared["ACTIVE"] and shared["PASSIVE"]:
            a, s = (statistics.mean(t.wall for t in shared[x]) for x in ("ACTIVE", "PASSIVE"))
            print(f"shared: ACTIVE / PASSIVE wall = {a / s:.2f}")
        elif "ACTIVE" in stopped and shared["PASSIVE"]:
            s = statistics.mean(t.wall for t in shared["PASSIVE"])
            print(f"shared: ACTIVE / PASSIVE wall > {args.shared_limit / s:.2f} (ACTIVE stopped at the limit)")
    for policy, calls in futex.items():
        print(f"futex calls, one run alone, {policy}: {calls}")


if __name__ == "__main__":
    main()
