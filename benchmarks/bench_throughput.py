"""Training and evaluation throughput (images/s) of the engine, per backbone and setting, on
synthetic data, beside a per-sample DataLoader pipeline of the kind other toolkits use.

    python benchmarks/bench_throughput.py                       # CPU, every case, fp32 / fp32-cl / bf16-cl
    python benchmarks/bench_throughput.py --threads 1 --cases resnet32-cifar --epochs 2
    python benchmarks/bench_throughput.py --cases resnet18-224 --per-class 2 --settings fp32 bf16-cl
    python benchmarks/bench_throughput.py --device cuda --settings fp32 bf16 bf16-cl bf16-cl+compile
    python benchmarks/bench_throughput.py --device cuda --amp   # one setting (bf16), as before --settings
    python benchmarks/bench_throughput.py --cases convnet-28x28 --per-class 20 --no-per-sample

Settings (``--settings``, any of them in one invocation): ``fp32`` or ``bf16`` (config key
``amp``: bf16 autocast), ``-cl`` for ``channels_last``, ``+compile`` for ``compile: true``
(``torch.compile`` of the forward; where it cannot compile, the engine warns and runs eagerly
and the row says so; the training figure includes the compilation, so give it several epochs,
and a later compile of the same model may reuse inductor's cache). Default: fp32, fp32-cl,
bf16-cl on CPU; fp32, bf16, bf16-cl on CUDA. ``--amp`` / ``--channels-last`` without
``--settings`` give the one setting they name.

Cases (``--cases``): convnet-28x28 (1 channel, 10 classes x 600 images), resnet32-cifar (100 x
40), resnet18_cifar-32 (100 x 10), resnet18-224 (ResNet-18 on 224x224 RGB, 100 x 2, the pad-28
crop and flip of in-memory file images); ``--classes`` / ``--per-class`` resize every case.

Each case under each setting is one state of a ``finetune`` run on seeded synthetic images held
in memory as uint8 (the real pipeline: batched on-device crop/flip/normalise, SGD, the engine's
loop). Training throughput is the run's own ``images_per_second`` (over all its epochs, warm-up
and any compilation included); evaluation throughput times ``Engine.infer`` over the training
images in ``eval_batch_size`` batches (median of 3). Every measurement follows an untimed
training step on a few images under its setting (the process's first use of the kernels).

The per-sample pipeline (``--no-per-sample`` skips it) runs on the same images, held as one
uint8 numpy array (N, H, W, C): a ``torch.utils.data.Dataset`` whose ``__getitem__`` takes ONE
image through PIL (``Image.fromarray``), pads it by the case's ``crop_pad`` and crops it back at a
random offset, flips it with probability 0.5, converts it to float and normalises it with numpy,
in a DataLoader (the engine's batch size, shuffled, ``--workers`` processes); then the same step
as the engine on the same model (built by cilkit's method, seeded alike), optimiser (SGD with the
run's momentum and weight decay) and loss, for the same epochs, on the same device and threads.
Its evaluation is a DataLoader of per-image normalised images and an eval-mode forward. It runs
under ``--per-sample-setting`` (default fp32: what those toolkits use), so the ratio of the
fp32 row isolates the data pipeline while the other rows include the precision and layout.

Prints one Markdown table: case, images, setting, train and eval images/s, and the ratio of each
to the per-sample pipeline's (whose row follows each case's settings).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cilkit.settings.config import RunConfig, validate
from cilkit.data import load_dataset
from cilkit.data.base import Dataset, TensorImages
from cilkit.training.engine import make_optimizer
from cilkit.training.protocol import FitSpec
from cilkit.run.loop import Run
from cilkit.run.setup import build_method_and_model, free_cores


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
    # ImageNet-subset-like: ResNet-18 at 224x224, the pad-crop of in-memory file images (size // 8)
    Case("resnet18-224", "resnet18", 224, 3, 100, 2, 28, True),
]


@dataclass(frozen=True)
class Setting:
    """Precision, memory layout and compilation of one measurement."""

    amp: bool = False
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        return ("bf16" if self.amp else "fp32") + ("-cl" if self.channels_last else "") + \
            ("+compile" if self.compile else "")


def parse_setting(text: str) -> Setting:
    """``fp32`` | ``bf16``, then optionally ``-cl``, then optionally ``+compile``."""
    base, plus, extra = text.strip().partition("+")
    precision, dash, layout = base.partition("-")
    if precision not in ("fp32", "bf16") or (dash and layout != "cl") or (plus and extra != "compile"):
        raise argparse.ArgumentTypeError(
            f"unknown setting '{text}' (fp32, bf16, fp32-cl, bf16-cl, each optionally with +compile)")
    return Setting(amp=precision == "bf16", channels_last=bool(dash), compile=bool(plus))


def default_settings(device: str) -> list[Setting]:
    names = ["fp32", "bf16", "bf16-cl"] if device.startswith("cuda") else ["fp32", "fp32-cl", "bf16-cl"]
    return [parse_setting(n) for n in names]


@dataclass(frozen=True)
class Row:
    case: str
    images: int
    setting: str
    train_ips: float
    eval_ips: float
    per_sample: bool = False  # the reference pipeline's row
    note: str = ""


# ----- the engine --------------------------------------------------------------------------------
def sized(case: Case, args: argparse.Namespace) -> Case:
    """The case with ``--classes`` / ``--per-class`` applied."""
    return Case(case.name, case.backbone, case.size, case.channels, args.classes or case.classes,
                args.per_class or case.per_class, case.crop_pad, case.flip)


def case_config(case: Case, args: argparse.Namespace, setting: Setting | None = None) -> dict:
    s = setting if setting is not None else Setting(args.amp, args.channels_last)
    return {
        "name": f"throughput-{case.name}", "seed": 0, "method": "finetune", "state0_cache": None,
        "device": args.device, "amp": s.amp, "channels_last": s.channels_last, "compile": s.compile,
        "threads": args.threads,
        "data": {"name": "synthetic", "crop_pad": case.crop_pad, "flip": case.flip,
                 "synthetic": {"num_classes": case.classes, "train_per_class": case.per_class,
                               "test_per_class": 1, "size": case.size, "channels": case.channels}},
        "scenario": {"initial": case.classes, "increment": 1, "states": 1},
        "memory": {"total": 0},
        "model": {"backbone": case.backbone},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 0.01,
                  "schedule": {"type": "constant"}, "eval_batch_size": args.eval_batch_size},
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(case: Case, args: argparse.Namespace, setting: Setting | None = None,
            dataset: Dataset | None = None) -> Row:
    """One state of a finetune run through the engine: its training and evaluation images/s."""
    s = setting if setting is not None else Setting(args.amp, args.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(validate(case_config(case, args, s)), tmp, progress=False, dataset=dataset)
        results = run.execute()
        train_ips = results["states"][0]["images_per_second"]
        indices = torch.arange(len(run.dataset.train.labels))

        def infer() -> None:
            run.engine.infer(run.model, run.dataset.train, indices, want_features=False)

        if s.compile:
            infer()  # compile the eval forward before it is timed
        eval_ips = indices.numel() / _median_seconds(infer, run.device)
        note = "compile failed: eager" if s.compile and not run.engine.compile else ""
    return Row(case.name, int(indices.numel()), s.name, train_ips, eval_ips, note=note)


# ----- the per-sample pipeline -------------------------------------------------------------------
class PerSampleImages(torch.utils.data.Dataset):
    """Images of a uint8 (N, H, W, C) numpy array, transformed one at a time as torchvision-style
    pipelines do: PIL image, pad-and-random-crop, random flip, float, per-image normalisation."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 crop_pad: int = 0, flip: bool = False, train: bool = True, seed: int = 0) -> None:
        self.images, self.labels = images, labels
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        self.crop_pad, self.flip, self.train = crop_pad, flip, train
        self.rng = np.random.default_rng(seed)  # replaced in each worker (worker_init)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = self.images[i]
        gray = arr.shape[2] == 1
        if gray:
            arr = arr[:, :, 0]
        h, w = arr.shape[:2]
        if self.train and self.crop_pad > 0:
            p = self.crop_pad
            pad_width = ((p, p), (p, p)) if gray else ((p, p), (p, p), (0, 0))
            img = Image.fromarray(np.pad(arr, pad_width))  # zeros, as the engine pads
            top, left = (int(v) for v in self.rng.integers(0, 2 * p + 1, size=2))
            img = img.crop((left, top, left + w, top + h))
        else:
            img = Image.fromarray(arr)
        if self.train and self.flip and self.rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = x[:, :, None] if gray else x
        x = (x - self.mean) / self.std  # per image, in numpy
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), int(self.labels[i])


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    assert info is not None and isinstance(info.dataset, PerSampleImages)
    info.dataset.rng = np.random.default_rng(info.seed)  # each worker its own crops and flips


def _loader(data: PerSampleImages, batch_size: int, shuffle: bool, workers: int, device: torch.device,
            seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, num_workers=workers, pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if workers > 0 else None, generator=torch.Generator().manual_seed(seed))


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _compiled_or_eager(model: torch.nn.Module, compile: bool) -> tuple[Callable[[torch.Tensor], Any], list[str]]:
    """``model``'s forward, compiled if asked; eager (and a note) from the first failure on."""
    notes: list[str] = []
    if not compile:
        return model, notes
    compiled = torch.compile(model)

    def forward(x: torch.Tensor) -> Any:
        if not notes:
            try:
                return compiled(x)
            except Exception:  # no C compiler, an unsupported op ...
                notes.append("compile failed: eager")
        return model(x)

    return forward, notes


def measure_per_sample(case: Case, args: argparse.Namespace, config: RunConfig, dataset: Dataset,
                       setting: Setting) -> Row:
    """The per-sample pipeline on ``dataset``'s training images: training images/s over
    ``args.epochs`` epochs, evaluation images/s (median of 3)."""
    torch.set_num_threads(config.threads or free_cores())
    device = torch.device(args.device)
    train = dataset.train
    assert isinstance(train, TensorImages)
    images = train.images.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C) uint8
    labels = train.labels.numpy()
    # the statistics the run normalises with (its state 0 holds every class)
    mean_t, std_t = train.channel_stats(torch.arange(len(train)))
    mean, std = mean_t.numpy(), std_t.clamp_min(1e-3).numpy()
    augment = dataset.augment
    _, model, _, _ = build_method_and_model(config, dataset)  # as Run builds it: same seed, same weights
    model.add_classes(dataset.num_classes)  # finetune's state 0: every class
    model.to(device)
    if setting.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer([{"params": [p for p in model.parameters() if p.requires_grad]}],
                         FitSpec.of_state(config.train, 0))
    forward, notes = _compiled_or_eager(model, setting.compile)
    prepare: Callable[[torch.Tensor], torch.Tensor] = (
        (lambda x: x.contiguous(memory_format=torch.channels_last)) if setting.channels_last else (lambda x: x))

    train_loader = _loader(PerSampleImages(images, labels, mean, std, augment.crop_pad, augment.flip, train=True),
                           config.train.batch_size, True, args.workers, device)
    seen = 0
    _sync(device)
    start = time.perf_counter()
    for _ in range(config.train.epochs):
        model.train()
        total = torch.zeros((), device=device)
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, setting.amp):
                out = forward(prepare(x))
            loss = F.cross_entropy(out["logits"].float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * x.shape[0]
            seen += x.shape[0]
        float(total)  # one sync per epoch, as the engine
    _sync(device)
    train_ips = seen / (time.perf_counter() - start)

    eval_loader = _loader(PerSampleImages(images, labels, mean, std, train=False), config.train.eval_batch_size,
                          False, args.workers, device)

    @torch.inference_mode()
    def infer() -> None:
        model.eval()
        for x, _ in eval_loader:
            with _autocast(device, setting.amp):
                out = forward(prepare(x.to(device, non_blocking=True)))
            out["logits"].float().cpu()

    if setting.compile:
        infer()
    eval_ips = len(labels) / _median_seconds(infer, device)
    return Row(case.name, len(labels), f"per-sample {setting.name}, {args.workers} workers", train_ips, eval_ips,
               per_sample=True, note=", ".join(notes))


# ----- the table ---------------------------------------------------------------------------------
def warm_up(config: RunConfig, dataset: Dataset, setting: Setting, images: int = 8) -> None:
    """One untimed training step on a few images under ``setting`` (eager), so that no
    measurement pays the process's first use of the backbone's kernels."""
    torch.set_num_threads(config.threads or free_cores())
    device = torch.device(config.device)
    _, model, _, _ = build_method_and_model(config, dataset)
    model.add_classes(dataset.num_classes)
    model.to(device)
    train = dataset.train
    assert isinstance(train, TensorImages)
    x = train.images[:images].to(device).float().div_(255.0)
    if setting.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(device, setting.amp):
        out = model(x)
    F.cross_entropy(out["logits"].float(), train.labels[:images].to(device)).backward()
    _sync(device)


def measure_case(case: Case, args: argparse.Namespace, settings: Sequence[Setting]) -> list[Row]:
    """Every setting of one case (the data read once), then the per-sample pipeline; each after
    an untimed warm-up step."""
    config = validate(case_config(case, args, Setting()))
    dataset = load_dataset(config.data)
    rows = []
    for s in settings:
        warm_up(config, dataset, s)
        rows.append(measure(case, args, s, dataset))
    if args.per_sample:
        warm_up(config, dataset, args.per_sample_setting)
        rows.append(measure_per_sample(case, args, config, dataset, args.per_sample_setting))
    return rows


def _ips(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def _ratio(value: float, reference: Row | None, attr: str) -> str:
    if reference is None:
        return "-"
    ref = getattr(reference, attr)
    return f"{value / ref:.2f}" if ref > 0 else "-"


def table(rows: Sequence[Row]) -> str:
    """Markdown: one row per (case, setting), then each case's per-sample row."""
    lines = ["| case | images | setting | train images/s | eval images/s | train vs per-sample | "
             "eval vs per-sample |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = next((q for q in rows if q.per_sample and q.case == r.case), None)
        setting = r.setting + (f" ({r.note})" if r.note else "")
        lines.append(f"| {r.case} | {r.images} | {setting} | {_ips(r.train_ips)} | {_ips(r.eval_ips)} | "
                     f"{_ratio(r.train_ips, ref, 'train_ips')} | {_ratio(r.eval_ips, ref, 'eval_ips')} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    assert __doc__ is not None
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    p.add_argument("--settings", nargs="+", type=parse_setting, default=None, metavar="SETTING",
                   help="fp32, bf16, fp32-cl, bf16-cl, each optionally +compile "
                        "(default: fp32 fp32-cl bf16-cl on CPU, fp32 bf16 bf16-cl on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (the one setting, without --settings)")
    p.add_argument("--channels-last", action="store_true", help="(the one setting, without --settings)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=1024)
    p.add_argument("--per-class", type=int, default=None, help="training images per class, every case")
    p.add_argument("--classes", type=int, default=None, help="classes, every case")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-sample pipeline")
    p.add_argument("--no-per-sample", dest="per_sample", action="store_false",
                   help="skip the per-sample pipeline")
    p.add_argument("--per-sample-setting", type=parse_setting, default=Setting(), metavar="SETTING",
                   help="setting of the per-sample pipeline (default fp32)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.settings is not None and (args.amp or args.channels_last):
        p.error("--amp / --channels-last name one setting; with --settings give it there (e.g. bf16-cl)")
    if args.settings is None:
        args.settings = ([Setting(args.amp, args.channels_last)] if args.amp or args.channels_last
                         else default_settings(args.device))
    args.settings = list(dict.fromkeys(args.settings))  # each once, in order
    for name in ("per_class", "classes", "epochs", "batch_size", "eval_batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "classes" else 0 if name == "epochs" else 1):
            p.error(f"--{name.replace('_', '-')}: {value} is too small")
    if args.workers < 0:
        p.error("--workers: must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    cases = [sized(c, args) for c in CASES if c.name in args.cases]
    rows = [row for c in cases for row in measure_case(c, args, args.settings)]
    per_sample = (f"per-sample pipeline {args.per_sample_setting.name}, {args.workers} workers"
                  if args.per_sample else "no per-sample pipeline")
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"eval batch {args.eval_batch_size}, epochs {args.epochs}, settings "
          f"{', '.join(s.name for s in args.settings)}; {per_sample}\n")
    print(table(rows))
    if args.per_sample:
        print("\n'vs per-sample': the engine's images/s over the per-sample pipeline's, same case "
              "(model, batch size, device, threads)")
    return rows


if __name__ == "__main__":
    main()
