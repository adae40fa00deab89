"""SIR ablation: each component of SIR on and off, beside fine-tuning, on one protocol.

    python benchmarks/bench_sir_ablation.py [--config configs/fashion-mnist.yaml]
        [--out runs/sir-ablation] [--variants all no-fc no-it no-ca fc-only none] [--set KEY=VALUE ...]

Every variant is a ``sir`` run of the same config (same seed, data, memory, epochs; the state-0
model is shared through the state-0 cache) with its switches set as below; ``finetune`` is the
host method without SIR. Runs go to ``<out>/<variant>/`` (an existing complete run is reused,
an interrupted one resumed). Prints a Markdown table (per-state top-1, mean incremental top-1 with
and without state 0, last-state old/new top-1, wall time) and writes it to ``<out>/ablation.md``
and ``<out>/ablation.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cilkit import io
from cilkit.config import apply_overrides, load_config, validate
from cilkit.runner import Run

FC, IT, CA = "frequency_compensation", "inheritance_transfer", "chronological_attenuation"
VARIANTS: dict[str, dict[str, bool] | None] = {
    "all": {FC: True, IT: True, CA: True},
    "no-ca": {FC: True, IT: True, CA: False},  # compensation without attenuation
    "no-it": {FC: True, IT: False, CA: True},
    "no-fc": {FC: False, IT: True, CA: False},  # attenuation needs compensation: inheritance only
    "fc-only": {FC: True, IT: False, CA: False},
    "none": {FC: False, IT: False, CA: False},  # every component off: fine-tuning, via sir
    "finetune": None,  # the host method itself
}


def variant_config(base: dict[str, Any], switches: dict[str, bool] | None) -> dict[str, Any]:
    data = dict(base)
    if switches is None:
        data["method"] = "finetune"
        return data
    data["method"] = "sir"
    data["sir"] = {**(base.get("sir") or {}), **switches}
    return data


def run_variant(base: dict[str, Any], name: str, out: Path) -> dict[str, Any]:
    cfg = validate(variant_config(base, VARIANTS[name]), source=f"variant '{name}'")
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


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | top-1 per state | mean incr. | mean incr. excl. state 0 | last old | last new | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {' '.join(f'{a:.2f}' for a in r['top1_per_state'])} | "
                     f"{r['mean_incremental_top1']:.2f} | {r['mean_incremental_top1_excl_first']:.2f} | "
                     f"{r['last_top1_old']:.2f} | {r['last_top1_new']:.2f} | {r['wall_time_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/fashion-mnist.yaml")
    p.add_argument("--out", type=Path, default=Path("runs/sir-ablation"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    base = apply_overrides(load_config(args.config).to_dict(), args.overrides)
    rows = [summary_row(v, run_variant(base, v, args.out)) for v in args.variants]
    table = markdown(rows)
    print(table)
    io.write_text(args.out / "ablation.md", table + "\n")
    io.write_json(args.out / "ablation.json", {"config": args.config, "overrides": args.overrides, "rows": rows})


if __name__ == "__main__":
    main()
