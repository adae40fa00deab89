"""Benchmark of active class-incremental learning on imbalanced Fashion-MNIST.

Compares the acquisition functions random, entropy, margin, k-center (each used in every
cycle, ``balancing: none``) and the balancing functions poor and bcore (later cycles, after a
random first cycle, the original code's default), each with and without class prediction
scaling, over several seeds; plus the fully labelled upper bound (the ``active`` method with
``budget: 1, cycles: 1``: fine-tuning on every image of the state, with and without scaling).

Runs that cannot differ in training save time: random, k-center, poor and bcore never read the
probabilities, so scaling only changes their test scores, and one run gives both rows (the
scaled ``scores`` and the ``unscaled`` variant). Entropy and margin select with the
(scaled or not) probabilities, so they run twice. Every run goes to ``OUT/<variant>/seed_<s>``
and is resumed (or skipped when complete) on a second call.

Prints a Markdown table of mean +- std (population, over seeds) of the mean incremental top-1
and balanced top-1 over states 1..S-1 (state 0 excluded, the active-IL convention).

    python benchmarks/bench_active.py --out runs/bench-active            # 3 seeds, 3 epochs/cycle
    python benchmarks/bench_active.py --seeds 1 --set train.epochs=1      # a quick look
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cilkit.common import io
from cilkit.settings.config import load_config
from cilkit.run.loop import Run
from cilkit.rundir.readers import read_results

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    name: str  # directory name
    label: str  # table row (without the scaling mark)
    overrides: tuple[str, ...]
    scaling_in_acquisition: bool  # True: scaling changes what is selected -> two runs


VARIANTS = [
    Variant("random", "random", ("active.classical=random", "active.balancing=none"), False),
    Variant("entropy", "entropy", ("active.classical=entropy", "active.balancing=none"), True),
    Variant("margin", "margin", ("active.classical=margin", "active.balancing=none"), True),
    Variant("kcenter", "k-center", ("active.classical=kcenter", "active.balancing=none"), False),
    Variant("poor", "random + poor", ("active.classical=random", "active.balancing=poor"), False),
    Variant("bcore", "random + bcore", ("active.classical=random", "active.balancing=bcore"), False),
    Variant("full", "fully labelled (FT, upper bound)",
            ("active.budget=1.0", "active.cycles=1", "active.classical=random", "active.balancing=none"), False),
]


def run_one(config: Path, out: Path, seed: int, overrides: list[str]) -> dict:
    """One run (resumed if it exists, skipped if complete); returns its results."""
    done = out / "results.json"
    if done.is_file() and json.loads(done.read_text()).get("complete"):
        return read_results(done)  # checked, score sets under today's names (an older run's "cnn": "unscaled")
    cfg = load_config(config, [*overrides, f"seed={seed}", "method=active"])
    return Run(cfg, out, progress=False).execute(resume=out.exists())


def mean_excl_first(results: dict, key: str, variant: str | None) -> float:
    states = results["states"][1:]
    if variant is None:
        return float(np.mean([s[key] for s in states]))
    return float(np.mean([s["variants"][variant][key] for s in states]))


def annotation_balance(results: dict) -> float:
    """Mean over states 1.. of (fewest / most annotations among the state's new classes)."""
    ratios = []
    for s in results["states"][1:]:
        counts = list(s.get("annotations_per_class", {}).values())
        if counts and max(counts) > 0:
            ratios.append(min(counts) / max(counts))
    return float(np.mean(ratios)) if ratios else float("nan")


def plan(out: Path, seeds: list[int], extra: list[str], only: set[str] | None) -> list[tuple]:
    """Rows of the table as (variant, scaling, [(run dir, overrides, seed, score set)] per seed)."""
    rows = []
    for v in VARIANTS:
        if only and v.name not in only:
            continue
        for scaling in (False, True):
            runs = []
            for seed in seeds:
                if v.scaling_in_acquisition:
                    d = out / f"{v.name}-{'scaled' if scaling else 'plain'}" / f"seed_{seed}"
                    runs.append((d, [*v.overrides, f"active.scaling={str(scaling).lower()}", *extra], seed, None))
                else:  # one run with scaling on: scores = scaled, variant "unscaled"
                    d = out / v.name / f"seed_{seed}"
                    runs.append((d, [*v.overrides, "active.scaling=true", *extra], seed, None if scaling else "unscaled"))
            rows.append((v, scaling, runs))
    return rows


def _job(args: tuple) -> str:
    config, d, overrides, seed = args
    run_one(config, d, seed, [*overrides, "threads=1"])
    return str(d)


def collect(config: Path, rows: list[tuple], workers: int) -> list[dict]:
    """Run every distinct run (``workers`` processes of one thread each), then summarise."""
    jobs = {str(d): (config, d, overrides, seed) for _, _, runs in rows for d, overrides, seed, _ in runs}
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for d in pool.map(_job, jobs.values()):
                print(f"done: {d}", flush=True)
    else:
        for job in jobs.values():
            _job(job)
    table_rows = []
    for v, scaling, runs in rows:
        per_seed = []
        for d, overrides, seed, variant in runs:
            r = run_one(config, d, seed, overrides)  # complete: read back
            per_seed.append((mean_excl_first(r, "top1", variant), mean_excl_first(r, "balanced_top1", variant),
                             annotation_balance(r)))
        arr = np.array(per_seed)
        table_rows.append({"label": v.label, "scaling": scaling, "mean": arr.mean(axis=0), "std": arr.std(axis=0)})
    return table_rows


def table(rows: list[dict], seeds: int) -> str:
    lines = [
        "| acquisition | scaling | mean inc. top-1 (excl. state 0) | mean inc. balanced top-1 | annotated min/max |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        m, s = r["mean"], r["std"]
        balance = "-" if np.isnan(m[2]) else f"{m[2]:.2f}"
        lines.append(f"| {r['label']} | {'yes' if r['scaling'] else 'no'} | {m[0]:.2f} ± {s[0]:.2f} | "
                     f"{m[1]:.2f} ± {s[1]:.2f} | {balance} |")
    lines.append(f"\nmean ± std over {seeds} seeds; annotated min/max: fewest / most annotations among a "
                 "state's new classes, averaged over states 1..S-1 (1 = balanced)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "active-fashion-mnist.yaml"))
    p.add_argument("--out", default="runs/bench-active")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--only", help="comma-separated variants (" + ",".join(v.name for v in VARIANTS) + ")")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, one thread each")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args()
    only = set(args.only.split(",")) if args.only else None
    plan_rows = plan(Path(args.out), list(range(args.seeds)), args.set, only)
    rows = collect(Path(args.config), plan_rows, args.workers)
    text = table(rows, args.seeds)
    io.write_text(Path(args.out) / "table.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
