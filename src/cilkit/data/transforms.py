"""Batched, device-side image transforms on uint8 tensors (no per-sample Python).

Training augmentation for small images is the CIFAR convention: pad by ``crop_pad`` pixels
(zeros), crop back to the original size at a random offset, flip horizontally with
probability 0.5. Random numbers come from the caller's generator (on CPU, so that the same
seed gives the same crops on any device). A data-parallel rank holding rows ``lo..hi`` of a
batch of ``n`` draws the numbers of all ``n`` and uses its rows (``part=(lo, hi, n)``): every
rank's generator stays in step, and the rows get what one process would have given them.
"""

from __future__ import annotations

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


def _rows(values: torch.Tensor, part: Part | None, device: torch.device) -> torch.Tensor:
    return (values if part is None else values[part[0] : part[1]]).to(device)


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None, part: Part | None = None) -> torch.Tensor:
    """Pad (N, C, H, W) by ``pad`` zeros and crop each image at its own random offset."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    draws = n if part is None else part[2]
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = _rows(torch.randint(0, 2 * pad + 1, (draws,), generator=generator), part, x.device)
    ox = _rows(torch.randint(0, 2 * pad + 1, (draws,), generator=generator), part, x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 gives (N, H, W, C); put channels back.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator | None, part: Part | None = None) -> torch.Tensor:
    """Flip each image horizontally with probability 0.5."""
    draws = x.shape[0] if part is None else part[2]
    flip = _rows(torch.rand(draws, generator=generator) < 0.5, part, x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment_batch(
    x: torch.Tensor, augment: Augment, generator: torch.Generator | None, part: Part | None = None
) -> torch.Tensor:
    x = random_crop(x, augment.crop_pad, generator, part)
    if augment.flip:
        x = random_flip(x, generator, part)
    return x


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 normalised with per-channel mean/std given in [0, 1] units."""
    x = x.to(torch.float32).div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
