"""Batched, device-side image transforms on uint8 tensors (no per-sample Python).

Training augmentation for small images is the CIFAR convention: pad by ``crop_pad`` pixels
(zeros), crop back to the original size at a random offset, flip horizontally with
probability 0.5.

The random numbers of a whole epoch are drawn before its first batch (:func:`draw_epoch`), on
the caller's CPU generator, so that the same seed gives the same crops on any device, and they
reach the device in one pinned, non-blocking copy: a batch's augmentation only indexes
device tensors, with no host round trip per batch. They are drawn batch by batch in the order
the per-batch draws of earlier versions used (row offsets, column offsets, flips), so an
epoch's augmentation, and every number a run produces, is what it was when each batch drew
its own. A data-parallel rank holding rows ``lo..hi`` of a batch of ``n`` draws the numbers of
all ``n`` and uses its rows (``part=(lo, hi, n)``): every rank's generator stays in step, and
the rows get what one process would have given them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Training augmentation. ``crop_pad``/``flip`` for in-memory images; file images use
    ``resized_crop`` (random-resized crop to their image size) and ``flip``."""

    crop_pad: int = 0
    flip: bool = False
    resized_crop: bool = False

    @property
    def is_identity(self) -> bool:
        return self.crop_pad == 0 and not self.flip and not self.resized_crop


Part = tuple[int, int, int]  # (lo, hi, n): rows lo..hi of a batch of n


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; from CPU to a GPU through pinned memory without blocking the host
    (the caching host allocator keeps the pinned buffer alive until the copy has run)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class BatchDraws:
    """One batch's augmentation numbers, on the device: ``offsets`` (2, N) row and column crop
    offsets (None without cropping), ``flips`` (N,) bool (None without flipping)."""

    offsets: torch.Tensor | None
    flips: torch.Tensor | None


@dataclass(frozen=True)
class EpochDraws:
    """An epoch's augmentation numbers on the device: per image, in the epoch's batch order,
    its row and column crop offsets and its flip (rows of ``values``: see :func:`draw_epoch`)."""

    values: torch.Tensor  # (rows, total) int64: [row offset, column offset][, flip]
    crop: bool
    flip: bool
    starts: tuple[int, ...]  # where each batch's images begin

    def batch(self, k: int, part: Part | None = None) -> BatchDraws:
        """The numbers of batch ``k`` (its rows ``lo..hi`` under data parallelism)."""
        start = self.starts[k]
        lo, hi = (0, self.starts[k + 1] - start) if part is None else part[:2]
        v = self.values[:, start + lo : start + hi]
        offsets = v[:2] if self.crop else None
        flips = v[-1].bool() if self.flip else None
        return BatchDraws(offsets=offsets, flips=flips)


def draw_epoch(
    augment: Augment, sizes: Sequence[int], generator: torch.Generator | None, device: torch.device | str
) -> EpochDraws:
    """Draw the augmentation numbers of an epoch whose batches have ``sizes`` (global sizes
    under data parallelism) from ``generator``, batch after batch: ``n`` row offsets, ``n``
    column offsets (``randint(0, 2 * crop_pad + 1)``, when cropping), ``n`` uniform numbers
    whose ``< 0.5`` flips (when flipping); then move them to ``device`` at once."""
    crop, flip = augment.crop_pad > 0, augment.flip
    parts: list[torch.Tensor] = []
    for n in sizes:
        rows = []
        if crop:
            rows.append(torch.randint(0, 2 * augment.crop_pad + 1, (n,), generator=generator))
            rows.append(torch.randint(0, 2 * augment.crop_pad + 1, (n,), generator=generator))
        if flip:
            rows.append((torch.rand(n, generator=generator) < 0.5).to(torch.int64))
        parts.append(torch.stack(rows) if rows else torch.empty((0, n), dtype=torch.int64))
    values = torch.cat(parts, dim=1) if parts else torch.empty((0, 0), dtype=torch.int64)
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    return EpochDraws(values=to_device(values, device), crop=crop, flip=flip, starts=tuple(starts))


def crop_at(x: torch.Tensor, pad: int, offsets: torch.Tensor) -> torch.Tensor:
    """Pad (N, C, H, W) by ``pad`` zeros and crop image i at row ``offsets[0, i]``, column
    ``offsets[1, i]`` of the padded image (one gather, no per-image Python)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 gives (N, H, W, C); put channels back.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def flip_where(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Image i flipped horizontally where ``flips[i]``."""
    return torch.where(flips[:, None, None, None], x.flip(3), x)


def augment_batch(x: torch.Tensor, augment: Augment, draws: BatchDraws) -> torch.Tensor:
    """Crop, then flip, the batch ``x`` with its numbers ``draws`` (from :meth:`EpochDraws.batch`)."""
    if draws.offsets is not None:
        x = crop_at(x, augment.crop_pad, draws.offsets)
    if draws.flips is not None:
        x = flip_where(x, draws.flips)
    return x


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 normalised with per-channel mean/std given in [0, 1] units."""
    x = x.to(torch.float32).div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
