"""Data-parallel runs under PyTorch's launcher, ``torchrun`` (``gloo`` on CPU, ``nccl`` on CUDA).

Every rank loads the same data, builds the same scenario and model from the run seed and runs
the same states. What differs is small and lives in three places:

- :meth:`cilkit.training.engine.Engine.fit` wraps the model in ``DistributedDataParallel``; each rank
  trains on its slice of the same seeded global batch (``train.batch_size`` stays the global
  batch, so learning rates keep their meaning) and the loss is scaled so that the averaged
  gradient is that of the global batch. After a fit, every rank takes rank 0's parameters and
  buffers (:func:`sync_state`). With ``train.sync_bn`` the BatchNorm layers normalise with the
  statistics of the global batch (:class:`GlobalBatchNorm`).
- :meth:`cilkit.training.engine.Engine.infer` shards its images over the ranks and gathers the outputs,
  so everything computed from inference (evaluation, herding, class means, IL2M and scaling
  statistics, BiC's bias stage, active acquisition) sees the same numbers on every rank and,
  drawing from the same seeded generators, decides the same. The runner checks this after each
  state (:func:`check_agreement`): ranks that disagree stop the run with one line.
- Only rank 0 touches the file system (``io``, ``history``, ``runlog``, the directory lock and
  TensorBoard consult :func:`is_main`); what rank 0 reads or decides from files (the run
  directory's checks, a checkpoint, a state-0 cache entry) reaches the others through
  :func:`from_main`.

A rank that dies makes the others fail their next collective (at once on a closed connection,
else after ``dist_timeout_s``); ``torchrun`` stops the remaining workers, and the command line
prints one line saying how to resume.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import signal
import warnings
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cilkit.common.errors import UserError

T = TypeVar("T")

resume_hint = "continue with the same torchrun command and cilkit run --resume DIR"  # the command line sets DIR


def launched() -> bool:
    """Started by ``torchrun`` (or any launcher setting the env:// variables) with more than
    one process in the run."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def backend() -> str | None:
    return str(dist.get_backend()) if active() else None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def local_world_size() -> int:
    """Processes of the run on this machine (what shares its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes files and prints (always true outside torchrun)."""
    return rank() == 0


def start(device: str, timeout_s: float) -> None:
    """Join the process group torchrun describes: ``nccl`` when the run's device is CUDA,
    ``gloo`` otherwise. A no-op outside torchrun and when already started."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise UserError("torchrun started several processes, but this PyTorch build has no torch.distributed")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise UserError(f"config key 'device': '{device}' asked for, but no CUDA device is available")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    signal.signal(signal.SIGTERM, _stopped_by_launcher)


def _stopped_by_launcher(signum: int, frame: Any) -> None:
    """torchrun stops the other workers when one fails: say so in one line, and leave through
    SystemExit so that the run directory's lock is released and no temporary file is left."""
    print(f"error: rank {rank()}: stopped by torchrun (another process of the run failed); the finished "
          f"states are saved: {resume_hint}", file=sys.stderr, flush=True)
    raise SystemExit(143)


def finish() -> None:
    """Wait for every rank at the end of a run that went well (rank 0 writes the report while
    the others wait), so that no process leaves while another still talks to it."""
    if active():
        dist.barrier()


def stop() -> bool:
    """Leave the process group; True when this process had joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def exit_process(code: int) -> NoReturn:
    """End a torchrun worker with ``code`` once its process group is destroyed: run the atexit
    handlers (logging's shutdown, wandb, a plugin's own) while the interpreter is whole, flush, and leave
    without the interpreter's teardown. In that teardown gloo's C++ objects that outlive
    ``destroy_process_group`` (the DDP modules still hold the group) are freed after Python is
    gone, and now and then a worker dies there with SIGABRT ("terminate called without an
    active exception", the failure described in pytorch/pytorch PR 179291); torchrun then stops
    the other ranks and reports a run that finished as failed. Skipping the teardown loses
    nothing: every file of the run is written and closed before this point."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` evaluated on rank 0 alone (a file read, a check of the run directory) and its
    value given to every rank; a :class:`UserError` it raises is raised on every rank (only
    rank 0 prints it)."""
    if not active():
        return fn()
    payload: tuple[str, Any] = ("", None)
    if is_main():
        try:
            payload = ("ok", fn())
        except UserError as e:
            payload = ("error", str(e))
    kind, value = broadcast_object(payload)
    if kind == "error":
        raise UserError(value)
    return value


def shard_bounds(n: int, r: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Rank ``r``'s contiguous slice ``[lo, hi)`` of ``n`` items: sizes differ by at most one,
    the larger slices first."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows (rank ``r`` holding :func:`shard_bounds` of
    ``n``), on ``local``'s device, identical on every rank."""
    if not active():
        return local
    world, size = world_size(), shard_bounds(n, 0)[1]  # rank 0 holds the largest slice
    dev = _comm_device()
    padded = torch.zeros((size, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = [p[: hi - lo] for p, (lo, hi) in zip(parts, (shard_bounds(n, r, world) for r in range(world)))]
    return torch.cat(rows).to(local.device)


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``values`` (a copy; ``values`` is left as it was)."""
    if not active():
        return values
    out = values.detach().clone().to(_comm_device())
    dist.all_reduce(out)
    return out.to(values.device)


def sync_state(module: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (after a fit: the BatchNorm running
    statistics of unsynchronised BatchNorm differ between ranks)."""
    if not active():
        return
    dev = _comm_device()
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
            buf = t.data.to(dev)
            dist.broadcast(buf, src=0)
            t.data.copy_(buf.to(t.device))


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel for one fit (rank 0's weights broadcast to every
    rank on entry). ``static_graph``: a fit runs the same hooks every step, and a method's loss
    may leave part of the model out (LUCIR's and BiC's frozen parts, active learning's stages);
    DDP learns which parameters take no gradient on the first step instead of searching the
    graph at every step. Buffers are not synchronised at each step: :func:`sync_state` aligns
    them after the fit."""
    if not active():
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")  # 1-channel stems
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False, static_graph=True)


def digest(parts: Iterable[Any]) -> str:
    """sha256 over tensors (their bytes) and other values (their repr)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes() if p.numel() else b"")
            h.update(str((p.dtype, tuple(p.shape))).encode())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|connection (reset|closed)|timed out|timeout", re.IGNORECASE)


def lost_contact(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another rank died or stalled (gloo
    reports it as a plain RuntimeError), or the ranks' disagreement: what a data-parallel run
    reports in one line, with the way to resume."""
    return active() and (isinstance(e, (dist.DistError, RanksDisagree)) or bool(_COLLECTIVE_FAILURE.search(str(e))))


def failure_line(e: BaseException) -> str:
    """A failed collective's message without gloo's source location and advice."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(e).split()))
    return text.split(". This is typically")[0][:200]


class RanksDisagree(RuntimeError):
    """The ranks of a data-parallel run computed different states."""


def check_agreement(what: str, value: str) -> None:
    """Stop with one line when the ranks hold different ``value`` (a digest of the model, the
    memory and the scores after a state): a rank that decided differently would make the run's
    results those of rank 0 alone."""
    if not active():
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RanksDisagree(f"{what}: rank(s) {', '.join(map(str, differ))} disagree with rank 0 "
                           "(model, memory or scores): the ranks did not compute the same thing")


class _SumOverRanks(torch.autograd.Function):
    """``y = sum over ranks of x``, on every rank; differentiable: the gradient of ``x`` on a
    rank is the sum over ranks of the gradients of ``y`` (each rank's ``y`` depends on every
    rank's ``x``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.detach().clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks
    (``train.sync_bn``), on CPU (``gloo``) and CUDA (``nccl``) alike; torch's SyncBatchNorm
    runs on GPUs only. Two passes (the global mean, then the global mean squared deviation)
    through a differentiable all-reduce (:class:`_SumOverRanks`), so gradients flow
    through the statistics as they do in one process. Outside training, or in one process,
    it is a plain BatchNorm; its state dict is a BatchNorm's."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = all_sum(torch.tensor([input.numel() / max(input.shape[1], 1)], device=input.device,
                                     dtype=input.dtype))
        mean = _SumOverRanks.apply(input.sum(dims)) / count
        centred = input - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self._update_running_stats(mean.detach(), var.detach(), float(count))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        assert self.running_mean is not None and self.running_var is not None
        with torch.no_grad():
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch's BatchNorm
                factor = 1.0 / float(self.num_batches_tracked) if self.num_batches_tracked is not None else 0.0
            else:
                factor = self.momentum
            unbiased = var * count / max(count - 1, 1)
            self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a :class:`GlobalBatchNorm` holding its
    parameters and statistics."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        bn = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        bn.train(module.training)
        return bn.to(next(iter(module.state_dict().values()), torch.empty(0)).device)
    for name, child in module.named_children():
        setattr(module, name, global_batchnorm(child))
    return module

