"""Wall time of a whole protocol: LUCIR on CIFAR-100, B50 in 5 steps, on CIFAR-100-shaped data.

    python benchmarks/bench_protocol.py --device cuda --amp --channels-last     # the full schedule
    python benchmarks/bench_protocol.py --threads 1 --epochs 2 --per-class 20   # CPU-sized (scaled)
    python benchmarks/bench_protocol.py --threads 1 --epochs 1 --per-class 2 --test-per-class 2 --out runs/p

The schedule is ``configs/lucir-cifar100-b50-5steps.yaml`` (``--config``), read with cilkit's
config loader and kept as it is: 6 states (50 classes, then 5 x 10), its epochs, batch size,
learning rate and schedule, memory (20 exemplars per class, herding), backbone and LUCIR
options. Only the data change: the ``synthetic`` source shaped like CIFAR-100 (100 classes, 500
training and 100 test images per class, 32x32 RGB, pad-4 crop and flip), and the run never
reuses a state-0 model (``state0_cache: null``).

For CPU-sized runs ``--epochs N`` sets ``train.epochs`` to N and scales the milestones with it
(160 epochs with milestones 80, 120 -> round(N*80/160), round(N*120/160); each at least 1 and
after the one before), ``--per-class`` / ``--test-per-class`` the images per class; the output
then says the schedule was scaled (versus the full protocol).

Times ``Run(...).execute()`` (its wall time; building the run, which generates the data, is
reported apart) and prints one summary line and a Markdown table per state (classes seen,
seconds, training images/s, top-1) from the run's results.json. The run goes to ``--out``
(a new or empty directory), else to a temporary directory removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cilkit.settings.config import load_config, validate
from cilkit.common.errors import UserError
from cilkit.rundir.layout import RunLayout
from cilkit.run.loop import Run

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lucir-cifar100-b50-5steps.yaml"
CIFAR100_SHAPE = {"num_classes": 100, "train_per_class": 500, "test_per_class": 100, "size": 32, "channels": 3}


def scaled_milestones(milestones: Sequence[int], full_epochs: int, epochs: int) -> list[int]:
    """``round(epochs * m / full_epochs)`` for each milestone, each at least 1 and at least one
    after the previous (a valid, increasing MultiStepLR schedule)."""
    out: list[int] = []
    for m in milestones:
        out.append(max(round(epochs * m / full_epochs), out[-1] + 1 if out else 1))
    return out


@dataclass(frozen=True)
class Scaling:
    """What differs from the full protocol (empty: nothing)."""

    changes: list[str]

    @property
    def scaled(self) -> bool:
        return bool(self.changes)

    def describe(self) -> str:
        if not self.scaled:
            return "the full protocol"
        return "a scaled schedule, NOT the full protocol: " + "; ".join(self.changes)


def protocol_config(args: argparse.Namespace) -> tuple[dict[str, Any], Scaling]:
    """The config file's run with synthetic CIFAR-100-shaped data and the benchmark's options."""
    data = load_config(args.config).to_dict()
    changes = []
    shape = dict(CIFAR100_SHAPE)
    for key, value, what in (("train_per_class", args.per_class, "training"),
                             ("test_per_class", args.test_per_class, "test")):
        if value is not None and value != shape[key]:
            changes.append(f"{value} of {shape[key]} {what} images per class")
            shape[key] = value
    data["data"] = {"name": "synthetic", "crop_pad": 4, "flip": True, "synthetic": shape}
    train = data["train"]
    full = int(train["epochs"])
    if args.epochs is not None and args.epochs != full:
        if full < 1:
            raise UserError(f"'{args.config}': train.epochs is {full}; nothing to scale --epochs from")
        schedule = train["schedule"]
        if schedule.get("type") == "multistep" and schedule.get("milestones"):
            new = scaled_milestones(schedule["milestones"], full, args.epochs)
            changes.append(f"{args.epochs} of {full} epochs, milestones {new} of {schedule['milestones']}")
            schedule["milestones"] = new
        else:
            changes.append(f"{args.epochs} of {full} epochs")
        if train.get("epochs_first") is not None:
            train["epochs_first"] = max(1, round(args.epochs * train["epochs_first"] / full)) \
                if train["epochs_first"] else 0
            changes.append(f"train.epochs_first {train['epochs_first']}")
        if isinstance(data.get("lucir"), dict) and data["lucir"].get("cbf"):
            changes.append("lucir.cbf_epochs not scaled")
        train["epochs"] = args.epochs
    data.update({"device": args.device, "amp": args.amp, "channels_last": args.channels_last,
                 "compile": args.compile, "threads": args.threads, "state0_cache": None,
                 "name": f"{data.get('name') or 'protocol'}-synthetic"})
    return data, Scaling(changes)


def _settings(results: dict[str, Any], config: dict[str, Any]) -> str:
    threads = results.get("provenance", {}).get("threads", config.get("threads"))
    return (f"device {config['device']}, {'bf16 autocast' if config['amp'] else 'fp32'}"
            f"{', channels-last' if config['channels_last'] else ''}{', compile' if config['compile'] else ''}, "
            f"threads {threads}")


def state_rows(results: dict[str, Any]) -> str:
    lines = ["| state | classes seen | train images | seconds | train images/s | top-1 |", "|---|---|---|---|---|---|"]
    for s in results["states"]:
        ips = s.get("images_per_second")
        lines.append(f"| {s['state'] + 1} | {s['classes_seen']} | {s.get('train_images', '-')} | {s['time_s']:.1f} | "
                     f"{'-' if ips is None else f'{ips:.0f}'} | {s['top1']:.2f} |")
    return "\n".join(lines)


def overall_train_ips(results: dict[str, Any]) -> float | None:
    """Training images per second over every state's fits (weighted by their time)."""
    seconds = sum(s.get("train_seconds") or 0.0 for s in results["states"])
    images = sum((s.get("images_per_second") or 0.0) * (s.get("train_seconds") or 0.0) for s in results["states"])
    return images / seconds if seconds > 0 else None


def run_protocol(config: dict[str, Any], out: Path) -> tuple[dict[str, Any], float, float]:
    """(results.json of the run, seconds building it, seconds of ``execute``)."""
    t0 = time.perf_counter()
    run = Run(validate(config), out, progress=False)
    t1 = time.perf_counter()
    run.execute()
    t2 = time.perf_counter()
    results = json.loads(RunLayout(out).results.read_text())
    return results, t1 - t0, t2 - t1


def report(results: dict[str, Any], config: dict[str, Any], scaling: Scaling, setup_s: float, wall_s: float,
           source: Path) -> str:
    ips = overall_train_ips(results)
    sched = config["train"]
    shape = config["data"]["synthetic"]
    line = (f"{results['method']} {len(results['states'])}/{results['num_states']} states "
            f"({'complete' if results['complete'] else 'INCOMPLETE'}) of {source.name} on synthetic "
            f"CIFAR-100-shaped data ({shape['num_classes']} classes, {shape['train_per_class']} train / "
            f"{shape['test_per_class']} test images per class, {shape['size']}x{shape['size']}x{shape['channels']}), "
            f"{sched['epochs']} epochs, milestones {sched['schedule'].get('milestones')}, batch {sched['batch_size']}: "
            f"execute {wall_s:.1f} s wall (setup {setup_s:.1f} s), training "
            f"{'-' if ips is None else f'{ips:.0f}'} images/s, last top-1 {results['states'][-1]['top1']:.2f}, "
            f"mean incremental top-1 {results.get('mean_incremental_top1', float('nan')):.2f}; "
            f"{_settings(results, config)}; {scaling.describe()}")
    note = ("\n\nscaled: epochs and/or images per class differ from the protocol; times are not those "
            "of the full run" if scaling.scaled else "\n\nfull protocol: every epoch and image of the schedule")
    return line + "\n\n" + state_rows(results) + note


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    assert __doc__ is not None
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the protocol (default: LUCIR B50 5 steps)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (compile: true)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="run directory (new or empty; default: a temporary one)")
    p.add_argument("--epochs", type=int, default=None, help="scaled schedule: N epochs per state")
    p.add_argument("--per-class", type=int, default=None, help="training images per class (CIFAR-100: 500)")
    p.add_argument("--test-per-class", type=int, default=None, help="test images per class (CIFAR-100: 100)")
    args = p.parse_args(argv)
    for name in ("epochs", "per_class", "test_per_class", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.out is not None and args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        p.error(f"--out '{args.out}': not a new or empty directory")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config, scaling = protocol_config(args)
    if args.out is not None:
        results, setup_s, wall_s = run_protocol(config, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-protocol-") as tmp:
            results, setup_s, wall_s = run_protocol(config, Path(tmp))
    print(report(results, config, scaling, setup_s, wall_s, args.config))
    return {"results": results, "config": config, "scaled": scaling.scaled, "setup_s": setup_s, "wall_s": wall_s}


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
