"""Issue 39 item 7: what DER, FOSTER and MEMO cost in time per state against fine-tuning on the
Fashion-MNIST protocol. Runs fashion-mnist, der-, foster- and memo-fashion-mnist one after the
other (seed 0, 2 threads: run it on an otherwise idle machine) into OUT, then prints each state's
wall time (training, memory and evaluation: results.json ``time_s``) and its ratio to
fine-tuning's, and the mean over the incremental states (2 to 5).
    python benchmarks/fm_dynamic_time.py OUT            # or --report-only OUT
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CONFIGS = ["fashion-mnist", "der-fashion-mnist", "foster-fashion-mnist", "memo-fashion-mnist"]


def run_all(out: Path) -> None:
    for cfg in CONFIGS:
        if find_results(out / cfg) is not None:
            continue
        subprocess.run([sys.executable, "-m", "cilkit", "run", cfg, "--set", "threads=2", "--set", "seed=0",
                        "--out", str(out / cfg)], check=True)


def find_results(run: Path) -> Path | None:
    """The run's results.json (a one-method run writes it in OUT, a comparison in OUT/<method>), or None."""
    found = sorted(run.glob("results.json")) or sorted(run.glob("*/results.json"))
    return found[0] if found else None


def results_file(run: Path) -> Path:
    found = find_results(run)
    if found is None:
        raise SystemExit(f"{run}: no results.json (the run did not finish)")
    return found


def state_times(run: Path) -> list[float]:
    results = json.loads(results_file(run).read_text())
    return [float(s["time_s"]) for s in results["states"]]


def report(out: Path) -> None:
    base = state_times(out / CONFIGS[0])
    print("| config | " + " | ".join(f"state {i + 1} (s)" for i in range(len(base))) + " | mean states 2+ (s) | x fine-tuning |")
    print("|---|" + "---|" * (len(base) + 2))
    for cfg in CONFIGS:
        t = state_times(out / cfg)
        inc = sum(t[1:]) / len(t[1:])
        ratio = inc / (sum(base[1:]) / len(base[1:]))
        print(f"| {cfg} | " + " | ".join(f"{x:.1f}" for x in t) + f" | {inc:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    only = args and args[0] == "--report-only"
    target = Path(args[-1]) if args and not args[-1].startswith("--") else None
    if target is None:
        sys.exit("usage: python benchmarks/fm_dynamic_time.py [--report-only] OUT")
    if not only:
        run_all(target)
    report(target)
