"""Training and evaluation throughput (images/s) of the engine, per backbone, on synthetic data.

    python benchmarks/bench_throughput.py                       # CPU, every case
    python benchmarks/bench_throughput.py --device cuda --amp   # on a GPU machine, bf16 autocast
    python benchmarks/bench_throughput.py --cases resnet32-cifar --epochs 2

Each case is one state of a ``finetune`` run on seeded synthetic images held in memory as uint8
(the real pipeline: batched on-device crop/flip/normalise, SGD, the engine's loop). Training
throughput is the run's own ``images_per_second`` (over all its epochs, warm-up included);
evaluation throughput times ``Engine.infer`` over the training images in ``eval_batch_size``
batches (median of 3). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from cilkit.config import validate
from cilkit.runner import Run


@dataclass(frozen=True)
class Case:
    name: str
    backbone: str
    size: int
    channels: int
    classes: int
    per_class: int
    crop_pad: int
    flip: bool


CASES = [
    Case("convnet-28x28", "convnet", 28, 1, 10, 600, 0, False),  # Fashion-MNIST-like
    Case("resnet32-cifar", "resnet32", 32, 3, 100, 40, 4, True),  # CIFAR-100-like
    Case("resnet18_cifar-32", "resnet18_cifar", 32, 3, 100, 10, 4, True),
]


def case_config(case: Case, args: argparse.Namespace) -> dict:
    return {
        "name": f"throughput-{case.name}", "seed": 0, "method": "finetune", "state0_cache": None,
        "device": args.device, "amp": args.amp, "channels_last": args.channels_last, "threads": args.threads,
        "data": {"name": "synthetic", "crop_pad": case.crop_pad, "flip": case.flip,
                 "synthetic": {"num_classes": case.classes, "train_per_class": case.per_class,
                               "test_per_class": 1, "size": case.size, "channels": case.channels}},
        "scenario": {"initial": case.classes, "increment": 1, "states": 1},
        "memory": {"total": 0},
        "model": {"backbone": case.backbone},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 0.01,
                  "schedule": {"type": "constant"}, "eval_batch_size": args.eval_batch_size},
    }


def measure(case: Case, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(validate(case_config(case, args)), tmp, progress=False)
        results = run.execute()
        train_ips = results["states"][0]["images_per_second"]
        indices = torch.arange(len(run.dataset.train.labels))
        times = []
        for _ in range(3):
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run.engine.infer(run.model, run.dataset.train, indices, want_features=False)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return {"case": case.name, "images": int(indices.numel()), "train_ips": train_ips,
            "eval_ips": indices.numel() / statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=1024)
    args = p.parse_args()
    rows = [measure(c, args) for c in CASES if c.name in args.cases]
    print(f"device {args.device}, amp {args.amp}, channels_last {args.channels_last}, "
          f"threads {torch.get_num_threads()}, batch {args.batch_size}, eval batch {args.eval_batch_size}\n")
    print("| case | images | train images/s | eval images/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['images']} | {r['train_ips']:.0f} | {r['eval_ips']:.0f} |")


if __name__ == "__main__":
    main()
