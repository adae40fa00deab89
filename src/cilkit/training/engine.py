"""The one training step and the batched evaluation, shared by every method.

The engine owns the step: the optimiser and schedule of the :class:`~cilkit.training.protocol.FitSpec`,
the teacher's forward (once per batch, without gradients, under the student's autocast, memory
format and compiled graph), the sum of the loss's named terms and their epoch means, the
gradients as the hooks' ``before_step`` leaves them, clipped or clamped, the optimiser step.
What is trained supplies the training indices and the
:class:`~cilkit.training.protocol.FitHooks`: parameter groups, teacher, input mixing, loss, train
mode, per-epoch hooks
and the order of the epoch's images (see :mod:`cilkit.training.protocol`). Data stays on the training
device; a fit may also run over rows of cached features or logits (:class:`~cilkit.data.base.Rows`:
BiC's bias layer).
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from cilkit.common import distributed
from cilkit.settings.config import ScheduleConfig
from cilkit.data.base import Dataset, ImageSet, Rows, batch_sizes, shuffled
from cilkit.common.errors import described
from cilkit.training.divergence import all_finite, check_finite, track_peak
from cilkit.training.protocol import Batch, Context, EpochRecord, FitHooks, FitSpec, LossTerms
from cilkit.common.runlog import log

__all__ = ["Batch", "Engine", "EpochRecord", "FitHooks", "FitSpec", "make_optimizer", "make_scheduler",
           "replay_order", "sgdr_lr", "summed_terms"]

EpochCallback = Callable[[Context, EpochRecord], None]


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


def make_optimizer(groups: list[dict[str, Any]], spec: FitSpec) -> torch.optim.Optimizer:
    """The fit's optimiser over ``groups`` (a group may set its own ``lr`` / ``weight_decay``):
    SGD with momentum (the default, the papers'), Adam or AdamW."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.optimizer == "adam":
        return torch.optim.Adam(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.optimizer!r} (sgd, adam, adamw)")


def summed_terms(terms: LossTerms | torch.Tensor) -> tuple[torch.Tensor, LossTerms]:
    """(the loss, its named terms): the terms summed in their order, left to right (a bare
    tensor is one term, ``"loss"``)."""
    if isinstance(terms, torch.Tensor):
        terms = {"loss": terms}
    if not terms:
        raise ValueError("a loss returned no term")
    return functools.reduce(operator.add, terms.values()), terms


def sgdr_lr(epoch: int, lr: float, s: ScheduleConfig) -> float:
    """The learning rate of a fit's epoch ``epoch`` (0-based) under ``type: sgdr``: the first
    ``warmup_epochs`` at ``lr * warmup_factor``, then SGDR (Loshchilov & Hutter, ICLR 2017,
    eq. 5): ``min_lr + (lr - min_lr) * (1 + cos(pi * T_cur / T_i)) / 2`` over cycles of
    ``T_i = period * period_mult ** i`` epochs, ``T_cur`` the epochs since the cycle began.
    With warmup_epochs 1, warmup_factor 0.1, period 1, period_mult 2 it is GDumb's loop
    (drimpossible/GDumb ``src/main.py``: lr/10 at epoch 0, lr at epoch 1, then
    ``CosineAnnealingWarmRestarts(T_0=1, T_mult=2).step()`` once per epoch)."""
    if epoch < s.warmup_epochs:
        return lr * s.warmup_factor
    t, cycle = epoch - s.warmup_epochs, s.period
    while t >= cycle:
        t, cycle = t - cycle, cycle * s.period_mult
    return s.min_lr + (lr - s.min_lr) * (1 + math.cos(math.pi * t / cycle)) / 2


def make_scheduler(opt: torch.optim.Optimizer, s: ScheduleConfig, epochs: int) -> Any:
    """The per-epoch schedule of ``s`` over ``opt`` (the engine steps it once per epoch; the
    first epoch reads its value at epoch 0); None for ``constant``."""
    if s.type == "sgdr":  # each parameter group from its own lr, to the one absolute min_lr
        bases = [float(g["lr"]) for g in opt.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(
            opt, [functools.partial(_sgdr_factor, lr=b, s=s) for b in bases])
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
        eval_batch_size: int,
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
        self.eval_batch_size = eval_batch_size
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
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def fit(
        self,
        ctx: Context,
        hooks: FitHooks,
        indices: torch.Tensor,
        spec: FitSpec,
        desc: str = "train",
        stage: str = "train",
        *,
        model: torch.nn.Module | None = None,
        data: ImageSet | Rows | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Train ``model`` (default ``ctx.model``) on ``indices`` of ``data`` (default the
        training set) with ``hooks``: a fresh optimiser of ``spec`` over ``hooks.param_groups``
        for ``spec.epochs`` epochs under ``spec.schedule``, the images of each epoch in
        ``hooks.batch_order`` drawn from ``generator`` (default the state's), the model in
        ``hooks.train_mode``; the teacher's outputs (``hooks.teacher``) in ``batch.teacher``.
        ``desc`` labels the progress bar; ``stage`` names the fit in the history: every epoch's
        :class:`EpochRecord` (with each loss term's mean) goes to ``on_epoch`` and is returned
        under ``"epochs"``."""
        model = ctx.model if model is None else model
        data = self.dataset.train if data is None else data
        rows = isinstance(data, Rows)  # cached features: the same rows on every rank, no DDP
        if self.channels_last and not rows:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        params = hooks.param_groups(ctx)
        opt = make_optimizer(params, spec)
        sched = make_scheduler(opt, spec.schedule, spec.epochs)
        step_params = [p for g in params for p in g["params"]]
        parallel = distributed.active() and not rows
        # cached rows: a small model (a bias layer) trained eagerly, the same on every rank
        net = model if rows else self._forward(distributed.wrap(model, self.device), keep=not parallel)
        teacher_model = hooks.teacher(ctx)
        teacher = self._forward(teacher_model, keep=False) if teacher_model is not None else None
        shard = (distributed.rank(), distributed.world_size()) if parallel else None
        records: list[EpochRecord] = []
        start, seen = time.perf_counter(), 0
        bar = tqdm(range(spec.epochs), desc=desc, leave=False, disable=self._bar_disabled())
        batch_size = spec.batch_size

        epoch_sizes: list[int] = []  # the global batch sizes of the epoch's order (DDP's loss weights)

        def order(idx: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
            ordered = hooks.batch_order(ctx, idx, batch_size, gen)
            epoch_sizes[:] = batch_sizes(ordered.numel(), batch_size)
            return ordered

        for e in bar:
            hooks.train_mode(ctx, model)
            hooks.begin_epoch(ctx, e + 1)
            epoch_start, lr_now = time.perf_counter(), float(opt.param_groups[0]["lr"])
            total, count = torch.zeros((), device=self.device), 0
            term_sums: dict[str, torch.Tensor] = {}
            term_peaks: dict[str, torch.Tensor] = {}  # each term's largest finite batch value: which one blew up
            for k, (x, labels, idx) in enumerate(data.batches(
                indices,
                batch_size,
                mean=self.mean,
                std=self.std,
                augment=self.dataset.augment if not rows else None,
                order=order,
                generator=ctx.generator if generator is None else generator,
                device=self.device,
                shard=shard,
            )):
                batch = hooks.mix_inputs(ctx, Batch(x=self._prepare(x), y=ctx.targets(labels), idx=idx))
                x = batch.x
                batch.teacher = self._teacher_outputs(teacher, x, hooks.needs_stages)
                with self._autocast():
                    out = _as_outputs(net(x, stages=True) if hooks.needs_stages else net(x))
                out = _floated(out)
                if x.shape[0]:
                    loss, terms = summed_terms(hooks.loss(ctx, batch, out))
                else:
                    loss, terms = _no_loss(out), {}
                opt.zero_grad(set_to_none=True)
                # a rank's mean loss over its slice, weighted so that DDP's average over the
                # ranks is the mean over the global batch (slices may differ by one image)
                (loss * (x.shape[0] * distributed.world_size() / epoch_sizes[k]) if shard else loss).backward()
                hooks.before_step(ctx)
                _limit_gradients(step_params, spec)
                opt.step()
                hooks.after_step(ctx)
                total += loss.detach() * x.shape[0]
                count += x.shape[0]
                for name, t in terms.items():
                    term = t.detach().float() * x.shape[0]
                    term_sums[name] = term_sums[name] + term if name in term_sums else term
                    track_peak(term_peaks, name, t)
            checks = [all_finite(step_params, self.device), *(term_peaks[n] for n in term_sums)]
            epoch_loss, term_means, checked = self._epoch_means(total, count, term_sums, shard is not None, checks)
            check_finite(ctx, stage, e + 1, lr_now, epoch_loss, term_means, bool(checked[0]),
                          dict(zip(term_sums, checked[1:])))
            seen += count
            records.append(_epoch_record(stage, e + 1, epoch_loss, lr_now, count, time.perf_counter() - epoch_start,
                                         term_means))
            hooks.end_epoch(ctx, records[-1])
            if self.on_epoch is not None:
                self.on_epoch(ctx, records[-1])
            bar.set_postfix(loss=f"{epoch_loss:.3f}")
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(epoch_loss)
            elif sched is not None:
                sched.step()
        if not rows:
            distributed.sync_state(model)  # rank 0's BatchNorm statistics on every rank
        seconds = time.perf_counter() - start
        return {
            "epochs": records,
            "epoch_losses": [r.loss for r in records],  # each epoch's mean: its one host sync
            "train_seconds": seconds,
            "images_per_second": seen / seconds if seconds else None,
        }

    def _teacher_outputs(self, teacher: Callable[..., Any] | None, x: torch.Tensor, stages: bool
                         ) -> dict[str, Any] | None:
        """The teacher's outputs on ``x`` (float32, no gradient), under the student's autocast."""
        if teacher is None:
            return None
        with torch.no_grad(), self._autocast():
            out = _as_outputs(teacher(x, stages=True) if stages else teacher(x))
        return _floated(out)

    @staticmethod
    def _epoch_means(total: torch.Tensor, count: int, term_sums: dict[str, torch.Tensor], parallel: bool,
                     checks: list[torch.Tensor]) -> tuple[float, dict[str, float], list[float]]:
        """The epoch's mean loss, the mean of each term over its images, and the values of
        ``checks`` (0-d tensors: what :func:`check_finite` reads, this rank's): the epoch's one
        host sync (under torchrun, the global batch's: the same plateau decision on every rank)."""
        names = list(term_sums)
        sums = [term_sums[n] for n in names]
        if parallel:
            total, count = _summed(total, count)
            if sums:
                sums = list(distributed.all_sum(torch.stack(sums).double()).float().unbind())
        n = max(count, 1)
        means = torch.stack([total / n, *(t / n for t in sums), *(c.to(total.dtype) for c in checks)]).tolist()
        return means[0], dict(zip(names, means[1:len(names) + 1])), means[len(names) + 1:]

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
            indices, self.eval_batch_size, mean=self.mean, std=self.std, device=self.device
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


def _epoch_record(stage: str, epoch: int, loss: float, lr: float, images: int, seconds: float,
                  terms: dict[str, float]) -> EpochRecord:
    return EpochRecord(stage=stage, epoch=epoch, loss=loss, lr=lr,
                       images_per_second=images / seconds if seconds > 0 else None, seconds=seconds, terms=terms)


def _sgdr_factor(epoch: int, lr: float, s: ScheduleConfig) -> float:
    return sgdr_lr(epoch, lr, s) / lr if lr else 0.0  # a group at lr 0 stays there


def _as_outputs(out: Any) -> dict[str, Any]:
    """A model's outputs as a dict (a model over cached rows may return its logits alone)."""
    return {"logits": out} if isinstance(out, torch.Tensor) else out


def _floated(out: dict[str, Any]) -> dict[str, Any]:
    """Every tensor of ``out`` (also in lists and dicts: stage maps, auxiliary heads) in float32."""
    def floated(v: Any) -> Any:
        if isinstance(v, list):
            return [m.float() for m in v]
        if isinstance(v, dict):
            return {k: m.float() for k, m in v.items()}
        return v.float()

    return {k: floated(v) for k, v in out.items()}


def _limit_gradients(params: list[torch.Tensor], spec: FitSpec) -> None:
    """Clamp every gradient element to ``[-clamp_grad, clamp_grad]`` (PODNet's original; on the
    whole gradient of each parameter, as a hook on it would) and clip the global L2 norm to
    ``clip_grad_norm``; on the device, no host sync."""
    if spec.clamp_grad is None and spec.clip_grad_norm is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if spec.clamp_grad is not None and grads:
        torch._foreach_clamp_min_(grads, -spec.clamp_grad)
        torch._foreach_clamp_max_(grads, spec.clamp_grad)
    if spec.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, spec.clip_grad_norm, foreach=True)


def _no_loss(out: dict[str, Any]) -> torch.Tensor:
    """A zero loss joined to the outputs' graph, for a rank whose slice of the last batch is
    empty: it still takes part in the gradient all-reduce."""
    tensors = [t for v in out.values()
               for t in (v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else [v])]
    return sum((t.sum() for t in tensors), torch.zeros((), device=out["logits"].device)) * 0.0


def _summed(total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    both = distributed.all_sum(torch.stack([total.double(), torch.tensor(float(count), device=total.device)]))
    return both[0].to(total.dtype), int(both[1])


def _cat(parts: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)
