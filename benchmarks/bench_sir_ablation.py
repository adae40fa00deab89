"""SIR ablation: each component of SIR on and off, beside fine-tuning, on one protocol.

    python benchmarks/bench_sir_ablation.py [configs/ablations/sir-fashion-mnist.yaml]
        [--out runs/sir-ablation] [--variants all no-ca ...] [--set KEY=VALUE ...]

The ablation config names a run config (``protocol``) and the variants (``variants``: name ->
SIR switches, or null for the host method ``finetune``). Every variant is a run of the same
protocol (same seed, data, memory, epochs; the state-0 model is shared through the state-0
cache). Runs go to ``<out>/<variant>/`` (an existing complete run is reused, an interrupted one
resumed). Prints the table of ``cilkit compare`` (per-state top-1, mean incremental top-1 with
and without state 0, last-state old/new top-1, forgetting, wall time), writes it to
``<out>/ablation.md`` and the variants' summaries to ``<out>/ablation.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cilkit import io
from cilkit.config import apply_overrides, load_config, read_yaml, validate
from cilkit.errors import UserError
from cilkit.report import state_table
from cilkit.runner import Run

DEFAULT_ABLATION = Path(__file__).resolve().parents[1] / "configs" / "ablations" / "sir-fashion-mnist.yaml"
Switches = dict[str, bool] | None


def load_ablation(path: Path) -> tuple[Path, dict[str, Switches]]:
    """(protocol config path, {variant: switches}) of an ablation config; mistakes are UserErrors."""
    data = read_yaml(path)
    if not isinstance(data, dict) or set(data) != {"protocol", "variants"} or not isinstance(data["variants"], dict):
        raise UserError(f"ablation config '{path}': needs exactly the keys 'protocol' and 'variants' (a mapping)")
    for name, switches in data["variants"].items():
        if switches is not None and not isinstance(switches, dict):
            raise UserError(f"ablation config '{path}': variant '{name}' must be a mapping of SIR options or null")
    return (path.parent / str(data["protocol"])).resolve(), data["variants"]


def variant_config(base: dict[str, Any], switches: Switches) -> dict[str, Any]:
    data = dict(base)
    if switches is None:
        data["method"] = "finetune"
        return data
    data["method"] = "sir"
    data["sir"] = {**(base.get("sir") or {}), **switches}
    return data


def run_variant(base: dict[str, Any], name: str, switches: Switches, out: Path) -> dict[str, Any]:
    cfg = validate(variant_config(base, switches), source=f"variant '{name}'")
    run_dir = out / name
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ablation", nargs="?", type=Path, default=DEFAULT_ABLATION, help="ablation config")
    p.add_argument("--out", type=Path, default=Path("runs/sir-ablation"))
    p.add_argument("--variants", nargs="+", help="a subset of the config's variants, in this order")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    protocol, variants = load_ablation(args.ablation)
    chosen = args.variants or list(variants)
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; the config has {list(variants)}")
    base = apply_overrides(load_config(protocol).to_dict(), args.overrides)
    results = {v: run_variant(base, v, variants[v], args.out) for v in chosen}
    rows = [summary_row(v, r) for v, r in results.items()]
    table = state_table(results)
    print(table)
    io.write_text(args.out / "ablation.md", table + "\n")
    io.write_json(args.out / "ablation.json", {"ablation": str(args.ablation), "protocol": str(protocol),
                                               "overrides": args.overrides, "rows": rows})


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
