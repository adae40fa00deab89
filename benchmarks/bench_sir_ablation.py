"""SIR ablation: each component of SIR on and off, beside fine-tuning, on one protocol, at one or
several memory sizes and seeds.

    python benchmarks/bench_sir_ablation.py [configs/ablations/sir-fashion-mnist.yaml]
        [--out runs/sir-ablation] [--variants all none ...] [--memory-per-class 200 50 protocol ...]
        [--seeds 0 1 2] [--set KEY=VALUE ...]

The ablation config names a run config (``protocol``), the variants (``variants``: name -> SIR
switches, or null for the host method ``finetune``) and, optionally, the memory sizes to sweep
(``memory_per_class``: a list of exemplars per class, ``null`` for the protocol's own memory;
absent = the protocol's memory only). Every variant is a run of the same protocol (same data,
epochs, state-0 model through the state-0 cache) at each memory size and seed (default: the
protocol's seed). Runs go to ``<out>/<memory>/<variant>/seed_<s>/`` with ``<memory>`` =
``per_class_<m>`` or ``protocol`` (a complete run is reused, an interrupted one resumed).

Prints and writes ``<out>/ablation.md``: per memory size the table of ``cilkit compare`` for the
first seed, then (several seeds) the mean +- std over seeds of the mean incremental top-1 without
state 0, per variant and memory size; ``<out>/ablation.json`` holds every run's summary row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from cilkit.common import io
from cilkit.settings.config import apply_overrides, load_config, read_yaml, validate
from cilkit.common.errors import UserError
from cilkit.analysis.tables import build_table, state_table
from cilkit.run.loop import Run
from cilkit.analysis.runsets import FoundRun, RunGroup

DEFAULT_ABLATION = Path(__file__).resolve().parents[1] / "configs" / "ablations" / "sir-fashion-mnist.yaml"
Switches = dict[str, bool] | None
Memory = int | None  # exemplars per class, or None for the protocol's memory


def load_ablation(path: Path) -> tuple[Path, dict[str, Switches], list[Memory]]:
    """(protocol config path, {variant: switches}, memory sizes) of an ablation config; mistakes
    are UserErrors."""
    data = read_yaml(path)
    if not isinstance(data, dict) or not {"protocol", "variants"} <= set(data) \
            or not set(data) <= {"protocol", "variants", "memory_per_class"} or not isinstance(data["variants"], dict):
        raise UserError(f"ablation config '{path}': needs the keys 'protocol' and 'variants' (a mapping), "
                        "and optionally 'memory_per_class' (a list)")
    for name, switches in data["variants"].items():
        if switches is not None and not isinstance(switches, dict):
            raise UserError(f"ablation config '{path}': variant '{name}' must be a mapping of SIR options or null")
    memory = data.get("memory_per_class", [None])
    if not isinstance(memory, list) or not memory or any(m is not None and (not isinstance(m, int) or m < 1) for m in memory):
        raise UserError(f"ablation config '{path}': 'memory_per_class' must be a list of positive integers or null")
    return (path.parent / str(data["protocol"])).resolve(), data["variants"], memory


def memory_label(memory: Memory) -> str:
    return "protocol" if memory is None else f"per_class_{memory}"


def variant_config(base: dict[str, Any], switches: Switches, memory: Memory = None, seed: int | None = None) -> dict[str, Any]:
    data = dict(base)
    if memory is not None:
        data["memory"] = {**(base.get("memory") or {}), "total": None, "per_class": memory}
    if seed is not None:
        data["seed"] = seed
    if switches is None:
        data["method"] = "finetune"
        return data
    data["method"] = "sir"
    data["sir"] = {**(base.get("sir") or {}), **switches}
    return data


def run_variant(base: dict[str, Any], name: str, switches: Switches, run_dir: Path, memory: Memory = None,
                seed: int | None = None) -> dict[str, Any]:
    cfg = validate(variant_config(base, switches, memory, seed), source=f"variant '{name}'")
    done = run_dir / "results.json"
    if done.is_file() and json.loads(done.read_text()).get("complete"):
        return json.loads(done.read_text())
    return Run(cfg, run_dir, progress=False).execute(resume=run_dir.exists())


def summary_row(name: str, res: dict[str, Any]) -> dict[str, Any]:
    last = res["states"][-1]
    return {
        "variant": name,
        "top1_per_state": [round(s["top1"], 2) for s in res["states"]],
        "mean_incremental_top1": res["mean_incremental_top1"],
        "mean_incremental_top1_excl_first": res["mean_incremental_top1_excl_first"],
        "last_top1_old": last["top1_old"],
        "last_top1_new": last["top1_new"],
        "wall_time_s": res["wall_time_s"],
    }


def variant_table(runs: dict[str, tuple[Path, dict[str, Any]]], seed: int | None = None) -> str:
    """The per-state Markdown table of ``cilkit compare`` for one run per variant (``{variant:
    (run directory, results)}``): each run is its own group of one protocol, labelled with its
    variant (a comparison would label every SIR variant ``sir``), and the report builds the table."""
    groups = [RunGroup(label=name, method=str(res.get("method", name)), protocol=1,
                       runs=(FoundRun(name, path, res),), seeds=(seed,))
              for name, (path, res) in runs.items()]
    return state_table(build_table(groups))


def seed_table(rows: list[dict[str, Any]], variants: list[str], memories: list[Memory]) -> str:
    """Markdown: mean +- std (population) over seeds of the mean incremental top-1 excluding
    state 0, one row per variant, one column per memory size."""
    head = "| variant | " + " | ".join(memory_label(m) for m in memories) + " |"
    lines = [head, "|" + "---|" * (len(memories) + 1)]
    for v in variants:
        cells = []
        for m in memories:
            vals = [r["mean_incremental_top1_excl_first"] for r in rows if r["variant"] == v and r["memory_per_class"] == m]
            cells.append(f"{np.mean(vals):.2f} ± {np.std(vals):.2f} (n={len(vals)})" if vals else "-")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ablation", nargs="?", type=Path, default=DEFAULT_ABLATION, help="ablation config")
    p.add_argument("--out", type=Path, default=Path("runs/sir-ablation"))
    p.add_argument("--variants", nargs="+", help="a subset of the config's variants, in this order")
    p.add_argument("--memory-per-class", nargs="+", metavar="M",
                   help="memory sizes to run instead of the config's (integers, or 'protocol')")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the protocol's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    protocol, variants, memories = load_ablation(args.ablation)
    chosen = args.variants or list(variants)
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; the config has {list(variants)}")
    if args.memory_per_class:
        try:
            memories = [None if m == "protocol" else int(m) for m in args.memory_per_class]
        except ValueError:
            p.error("--memory-per-class takes integers or 'protocol'")
    base = apply_overrides(load_config(protocol).to_dict(), args.overrides)
    seeds = args.seeds or [base["seed"]]
    rows, sections = [], []
    for m in memories:
        first: dict[str, tuple[Path, dict[str, Any]]] = {}
        for v in chosen:
            for s in seeds:
                run_dir = args.out / memory_label(m) / v / f"seed_{s}"
                res = run_variant(base, v, variants[v], run_dir, m, s)
                rows.append({**summary_row(v, res), "memory_per_class": m, "seed": s})
                first.setdefault(v, (run_dir, res))
        sections.append(f"### memory: {memory_label(m)}, seed {seeds[0]}\n\n" + variant_table(first, seeds[0]))
    text = "\n\n".join(sections)
    if len(seeds) > 1:
        text += f"\n\n### mean incremental top-1 excluding state 0, seeds {seeds}\n\n" + seed_table(rows, chosen, memories)
    print(text)
    io.write_text(args.out / "ablation.md", text + "\n")
    io.write_json(args.out / "ablation.json", {"ablation": str(args.ablation), "protocol": str(protocol),
                                               "overrides": args.overrides, "seeds": seeds, "rows": rows})


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
