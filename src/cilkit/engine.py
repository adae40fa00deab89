"""The one training loop and the batched evaluation, shared by every method.

Data stays on the training device; what is trained supplies the training indices and the
:class:`FitHooks`: parameter groups, loss, train mode, per-epoch hooks and the order of the
epoch's images (see ``cilkit.methods.base``).
"""

from __future__ import annotations

import abc

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from cilkit import distributed
from cilkit.config import ScheduleConfig, TrainConfig
from cilkit.data.base import Dataset, ImageSet, batch_sizes, shuffled
from cilkit.errors import described
from cilkit.runlog import log

if TYPE_CHECKING:
    from cilkit.methods.base import Context


@dataclass
class Batch:
    x: torch.Tensor  # normalised images on the device
    y: torch.Tensor  # class positions (0..n_seen-1) on the device
    idx: torch.Tensor  # indices into the training set


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of a fit, as the run's history records it."""

    stage: str  # "train", or a method's own stage (e.g. "balanced finetuning")
    epoch: int  # 1-based, within the fit
    loss: float  # mean training loss over the epoch's images
    lr: float  # of the first parameter group, before the scheduler stepped
    images_per_second: float | None
    seconds: float


EpochCallback = Callable[["Context", EpochRecord], None]


class FitHooks(abc.ABC):
    """What :meth:`Engine.fit` asks of the thing it trains for: a method, or a stage of one
    (LUCIR's class-balanced finetuning). Override what differs from the defaults."""

    needs_stages: bool = False  # the loss reads out["stages"], the backbone's stage maps (PODNet)

    def param_groups(self, ctx: "Context") -> list[dict[str, Any]]:
        """What the optimiser updates (default: every parameter that requires a gradient)."""
        return [{"params": [p for p in ctx.model.parameters() if p.requires_grad]}]

    @abc.abstractmethod
    def loss(self, ctx: "Context", batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's training loss (every method and stage states its own: the interface's one
        required hook; ``Method`` gives cross-entropy)."""

    def train_mode(self, ctx: "Context", model: torch.nn.Module) -> None:
        """Put ``model`` in the mode an epoch trains in, at the start of every epoch (default:
        ``model.train()``; LUCIR's balanced finetuning keeps the backbone in eval)."""
        model.train()

    def begin_epoch(self, ctx: "Context", epoch: int) -> None:
        """Before epoch ``epoch`` (1-based) of the fit."""

    def after_step(self, ctx: "Context") -> None:
        """After every optimiser step (WA clips its classifier's weights here); in place on
        the parameters, never a host sync."""

    def end_epoch(self, ctx: "Context", record: EpochRecord) -> None:
        """After an epoch, with what the history records of it."""

    def batch_order(
        self, ctx: "Context", indices: torch.Tensor, batch_size: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The epoch's training images in the order they are used, cut into consecutive batches
        of ``batch_size`` (default: a shuffle drawn from the state's generator). Composing
        batches (a fixed ratio of replayed to new images in each) is a reordering:
        :func:`replay_order`."""
        return shuffled(indices, generator)


def replay_order(
    new: torch.Tensor, replay: torch.Tensor, batch_size: int, replay_per_batch: int, generator: torch.Generator | None
) -> torch.Tensor:
    """An order of ``new`` and ``replay`` images in which every full batch of ``batch_size``
    holds ``batch_size - replay_per_batch`` new images then ``replay_per_batch`` replayed ones
    (SS-IL's batch composition), each side shuffled; the replayed images are cycled through as
    often as the new ones need, and the new images that do not fill a batch form the last one."""
    if not 0 < replay_per_batch < batch_size:
        raise ValueError(f"replay_per_batch must lie in 1..{batch_size - 1}, not {replay_per_batch}")
    n_new = batch_size - replay_per_batch
    new = shuffled(new, generator)
    full = new.numel() // n_new
    if replay.numel() == 0 or full == 0:
        return new
    repeats = -(-full * replay_per_batch // replay.numel())
    cycled = torch.cat([shuffled(replay, generator) for _ in range(repeats)])[: full * replay_per_batch]
    body = torch.cat([new[: full * n_new].view(full, n_new), cycled.view(full, replay_per_batch)], dim=1)
    return torch.cat([body.flatten(), new[full * n_new:]])


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, lr: float) -> torch.optim.SGD:
    """SGD with momentum and weight decay; a group may set its own ``lr`` / ``weight_decay``."""
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, s: ScheduleConfig, epochs: int) -> Any:
    if s.type == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=s.milestones, gamma=s.gamma)
    if s.type == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    if s.type == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=s.gamma, patience=s.patience)
    return None


class Engine:
    """Run-level settings bound once: device, precision, the train/test sets, normalisation."""

    def __init__(
        self,
        dataset: Dataset,
        train_cfg: TrainConfig,
        device: torch.device,
        mean: torch.Tensor,
        std: torch.Tensor,
        amp: bool = False,
        channels_last: bool = False,
        progress: bool | None = None,
        on_epoch: EpochCallback | None = None,
        compile: bool = False,
    ) -> None:
        self.dataset = dataset
        self.cfg = train_cfg
        self.device = device
        self.mean, self.std = mean, std
        self.amp = amp
        self.channels_last = channels_last
        self.progress = progress  # None: tqdm shows bars only on a terminal
        self.on_epoch = on_epoch  # told of every finished epoch (the run's history)
        self.compile = compile  # torch.compile the forward passes (off after a failure)
        self._compiled: dict[int, Any] = {}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def fit(
        self,
        ctx: "Context",
        hooks: FitHooks,
        indices: torch.Tensor,
        epochs: int,
        lr: float,
        schedule: ScheduleConfig,
        desc: str = "train",
        stage: str = "train",
    ) -> dict[str, Any]:
        """Train ``ctx.model`` on ``indices`` of the training set with ``hooks.loss``: a fresh
        SGD over ``hooks.param_groups`` at ``lr`` for ``epochs`` epochs, under ``schedule``
        (the run's momentum, weight decay and batch size), the images of each epoch in
        ``hooks.batch_order``, the model in ``hooks.train_mode``. ``desc`` labels the progress bar;
        ``stage`` names the fit in the history: every epoch's :class:`EpochRecord` goes to
        ``on_epoch`` and is returned under ``"epochs"``."""
        model = ctx.model
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        opt = make_optimizer(hooks.param_groups(ctx), self.cfg, lr)
        sched = make_scheduler(opt, schedule, epochs)
        net = self._forward(distributed.wrap(model, self.device), keep=not distributed.active())  # DDP under torchrun
        shard = (distributed.rank(), distributed.world_size()) if distributed.active() else None
        records: list[EpochRecord] = []
        start, seen = time.perf_counter(), 0
        bar = tqdm(range(epochs), desc=desc, leave=False, disable=self._bar_disabled())
        batch_size = self.cfg.batch_size

        epoch_sizes: list[int] = []  # the global batch sizes of the epoch's order (DDP's loss weights)

        def order(idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
            ordered = hooks.batch_order(ctx, idx, batch_size, generator)
            epoch_sizes[:] = batch_sizes(ordered.numel(), batch_size)
            return ordered

        for e in bar:
            hooks.train_mode(ctx, model)
            hooks.begin_epoch(ctx, e + 1)
            epoch_start, lr_now = time.perf_counter(), float(opt.param_groups[0]["lr"])
            total, count = torch.zeros((), device=self.device), 0
            for k, (x, labels, idx) in enumerate(self.dataset.train.batches(
                indices,
                batch_size,
                mean=self.mean,
                std=self.std,
                augment=self.dataset.augment,
                order=order,
                generator=ctx.generator,
                device=self.device,
                shard=shard,
            )):
                batch = Batch(x=x, y=ctx.targets(labels), idx=idx)
                with self._autocast():
                    out = net(self._prepare(batch.x), stages=True) if hooks.needs_stages else net(self._prepare(batch.x))
                out = {k: [m.float() for m in v] if isinstance(v, list) else v.float() for k, v in out.items()}
                loss = hooks.loss(ctx, batch, out) if x.shape[0] else _no_loss(out)
                opt.zero_grad(set_to_none=True)
                # a rank's mean loss over its slice, weighted so that DDP's average over the
                # ranks is the mean over the global batch (slices may differ by one image)
                (loss * (x.shape[0] * distributed.world_size() / epoch_sizes[k]) if shard else loss).backward()
                opt.step()
                hooks.after_step(ctx)
                total += loss.detach() * x.shape[0]
                count += x.shape[0]
            if shard is not None:  # the global batch's loss: the same plateau decision on every rank
                total, count = _summed(total, count)
            epoch_loss = (total / max(count, 1)).item()  # the epoch's one sync
            seen += count
            records.append(_epoch_record(stage, e + 1, epoch_loss, lr_now, count, time.perf_counter() - epoch_start))
            hooks.end_epoch(ctx, records[-1])
            if self.on_epoch is not None:
                self.on_epoch(ctx, records[-1])
            bar.set_postfix(loss=f"{epoch_loss:.3f}")
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(epoch_loss)
            elif sched is not None:
                sched.step()
        distributed.sync_state(model)  # rank 0's BatchNorm statistics on every rank
        seconds = time.perf_counter() - start
        return {
            "epochs": records,
            "epoch_losses": [r.loss for r in records],  # each epoch's mean: its one host sync
            "train_seconds": seconds,
            "images_per_second": seen / seconds if seconds else None,
        }

    def _bar_disabled(self) -> bool | None:
        return None if self.progress is None else not self.progress

    @torch.inference_mode()
    def infer(
        self,
        model: torch.nn.Module,
        images: ImageSet,
        indices: torch.Tensor,
        want_features: bool = True,
        hflip: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Logits (and features) of ``images[indices]`` in large batches, eval transform (plus a
        horizontal flip if ``hflip``), returned on CPU."""
        model.eval()
        forward = self._forward(model)
        n, sharded = indices.numel(), distributed.active() and indices.numel() >= distributed.world_size()
        if sharded:  # each rank its slice, then everyone gets all of them
            lo, hi = distributed.shard_bounds(n)
            indices = indices[lo:hi]
        logits, feats, labels = [], [], []
        for x, y, _ in images.batches(
            indices, self.cfg.eval_batch_size, mean=self.mean, std=self.std, device=self.device
        ):
            if hflip:
                x = x.flip(3)
            with self._autocast():
                out = forward(self._prepare(x))
            logits.append(out["logits"].float().cpu())
            if want_features:
                feats.append(out["features"].float().cpu())
            labels.append(y.cpu())
        result = {"logits": _cat(logits), "labels": _cat(labels, torch.int64)}
        if want_features:
            result["features"] = _cat(feats)
        if sharded:
            result = {k: distributed.gather_rows(v, n) for k, v in result.items()}
        return result

    def _forward(self, model: torch.nn.Module, keep: bool = True) -> Callable[..., dict[str, Any]]:
        """``model``'s forward, through ``torch.compile`` when the run asks for it (``compile:
        true``); where it cannot compile, one warning and the model runs eagerly from then on.
        ``keep``: reuse the compiled module in later calls (not for a fit's own DDP wrapper)."""
        if not self.compile:
            return model
        compiled = self._compiled.get(id(model)) if keep else None
        if compiled is None:
            compiled = torch.compile(model)
            if keep:
                self._compiled[id(model)] = compiled

        def forward(x: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
            if self.compile:
                try:
                    return compiled(x, **kwargs)
                except Exception as e:  # no C compiler, an unsupported op, an old GPU ...
                    self.compile = False
                    self._compiled.clear()
                    log(f"warning: compile: true, but torch.compile failed ({described(e, 200)}): "
                        "running without it")
            return model(x, **kwargs)

        return forward

    def train_features(self, model: torch.nn.Module, indices: torch.Tensor, hflip: bool = False) -> torch.Tensor:
        """Features of training images (eval transform: no augmentation)."""
        return self.infer(model, self.dataset.train, indices, hflip=hflip)["features"]


def _epoch_record(stage: str, epoch: int, loss: float, lr: float, images: int, seconds: float) -> EpochRecord:
    return EpochRecord(stage=stage, epoch=epoch, loss=loss, lr=lr,
                       images_per_second=images / seconds if seconds > 0 else None, seconds=seconds)


def _no_loss(out: dict[str, Any]) -> torch.Tensor:
    """A zero loss joined to the outputs' graph, for a rank whose slice of the last batch is
    empty: it still takes part in the gradient all-reduce."""
    tensors = [t for v in out.values() for t in (v if isinstance(v, list) else [v])]
    return sum((t.sum() for t in tensors), torch.zeros((), device=out["logits"].device)) * 0.0


def _summed(total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    both = distributed.all_sum(torch.stack([total.double(), torch.tensor(float(count), device=total.device)]))
    return both[0].to(total.dtype), int(both[1])


def _cat(parts: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)
