"""Image files decoded by Pillow: :class:`FileImages`, the image set of the file readers.

:class:`FileImages` decodes in DataLoader workers. Training images get a random-resized crop
(the standard Inception / ImageNet recipe) and a flip; evaluation images are resized on their
shorter side and centre-cropped. Each sample's random numbers are seeded from (a seed drawn from
the caller's generator, the sample's position), so the crops do not depend on the worker count.

The readers of ImageNet-style folders (``imagefolder``) and list files (``listfile``) that
build these sets are in :mod:`cilkit.data.folders`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from cilkit.data.base import ImageBatch, ImageSet, Order, batch_sizes, in_order
from cilkit.data.transforms import Augment, Part, augment_batch, draw_epoch, normalise, to_device
from cilkit.common.distributed import shard_bounds
from cilkit.common.errors import UserError, reason

DEFAULT_IMAGE_SIZE = 224


# --------------------------------------------------------------------------- per-image transforms


def is_high_depth(mode: str) -> bool:
    """Pillow's integer grayscale modes wider than 8 bits: 'I;16*' (how Pillow reads a 16-bit
    PNG) and 'I' (how older Pillow read one)."""
    return mode == "I" or mode.startswith("I;16")


def to_eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 'L', scaled by its depth (value * 255 / 65535, rounded);
    other images unchanged. Pillow's own conversion clips at 255, which turns a 16-bit picture
    nearly white. Values outside 0..65535 (a 32-bit image) are a ValueError, not clipped."""
    if not is_high_depth(img.mode):
        return img
    values = np.asarray(img).astype(np.int64)
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"pixel values {lo}..{hi} do not fit 16 bits (only 8- and 16-bit images are read)")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def open_image(path: str, mode: str) -> Image.Image:
    """Decode ``path`` fully into ``mode`` ('RGB' or 'L'); any failure is the file's fault."""
    try:
        with Image.open(path) as img:
            return to_eight_bit(img).convert(mode)
    except Exception as e:  # Pillow raises many types for bad files (OSError, SyntaxError, ...)
        raise UserError(f"cannot read image '{path}': {reason(e)}") from None


def resized_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Random-resized-crop box (left, top, right, bottom): area fraction in (0.08, 1), aspect ratio
    log-uniform in (3/4, 4/3); 10 tries, then the largest centred box of an allowed ratio."""
    area = width * height
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        w, h = int(round(height * (4 / 3))), height
    else:
        w, h = width, height
    w, h = min(w, width), min(h, height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_transform(img: Image.Image, size: int, flip: bool, rng: np.random.Generator) -> Image.Image:
    box = resized_crop_box(img.width, img.height, rng)
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def eval_transform(img: Image.Image, resize: int, size: int) -> Image.Image:
    """Resize the shorter side to ``resize``, then take the centred ``size`` x ``size`` crop."""
    w, h = img.size
    if w <= h:
        nw, nh = resize, max(int(resize * h / w), resize)
    else:
        nw, nh = max(int(resize * w / h), resize), resize
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W)."""
    t = torch.from_numpy(np.array(img, dtype=np.uint8))  # a writable copy
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- DataLoader plumbing


class _Decode(torch.utils.data.Dataset):
    """The selected positions of a FileImages, decoded and transformed one by one (in workers).

    Paths are a numpy bytes array, not a list of str: forked workers then share its pages
    instead of copying them as Python reference counts change.
    """

    def __init__(
        self,
        paths: np.ndarray,
        order: np.ndarray,
        mode: str,
        size: int,
        resize: int,
        train: bool,
        flip: bool,
        seed: int,
    ) -> None:
        self.paths, self.order, self.mode = paths, order, mode
        self.size, self.resize, self.train, self.flip, self.seed = size, resize, train, flip, seed

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[torch.Tensor | None, int, str | None]:
        i = int(self.order[k])
        try:
            img = open_image(os.fsdecode(self.paths[i]), self.mode)
        except UserError as e:  # re-raised in the main process, where it keeps its one-line message
            return None, i, str(e)
        if self.train:
            img = train_transform(img, self.size, self.flip, np.random.default_rng([self.seed, i]))
        else:
            img = eval_transform(img, self.resize, self.size)
        return to_tensor(img), i, None


def _collate(
    items: list[tuple[torch.Tensor | None, int, str | None]],
) -> tuple[torch.Tensor | None, torch.Tensor, str | None]:
    errors = [err for _, _, err in items if err is not None]
    idx = torch.tensor([i for _, i, _ in items], dtype=torch.int64)
    if errors:
        return None, idx, errors[0]
    return torch.stack([x for x, _, _ in items if x is not None]), idx, None


def _batch_parts(n: int, batch_size: int, shard: tuple[int, int] | None) -> list[tuple[int, Part]]:
    """Per batch of ``n`` positions: its start and the rows ``(lo, hi, size)`` this rank takes."""
    out = []
    for start, size in zip(range(0, n, batch_size), batch_sizes(n, batch_size)):
        lo, hi = shard_bounds(size, *shard) if shard is not None else (0, size)
        out.append((start, (lo, hi, size)))
    return out


class FileImages(ImageSet):
    """Images on disk, decoded by Pillow in ``workers`` DataLoader processes.

    ``image_size`` is the training crop and the evaluation crop; ``resize`` the evaluation
    resize of the shorter side (default ``round(image_size * 256 / 224)``, the ImageNet ratio).
    ``mode`` ('RGB' or 'L') is the one every image is converted to.
    """

    def __init__(
        self,
        paths: list[str],
        labels: torch.Tensor,
        *,
        image_size: int = DEFAULT_IMAGE_SIZE,
        resize: int | None = None,
        workers: int = 0,
        mode: str = "RGB",
    ) -> None:
        if len(paths) != labels.numel():
            raise ValueError(f"{len(paths)} paths but {labels.numel()} labels")
        self.paths = list(paths)
        self.labels = labels.to(torch.int64).cpu()
        self.image_size = image_size
        self.resize = resize if resize is not None else round(image_size * 256 / 224)
        self.workers = workers
        self.mode = mode
        self._paths = np.array([os.fsencode(p) for p in self.paths], dtype=np.bytes_)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def geometry(self) -> tuple[int, int]:
        return self.channels, self.image_size  # every batch is an image_size square crop

    def _decoded(
        self,
        order: torch.Tensor,
        batch_sizes: list[int],
        *,
        train: bool = False,
        flip: bool = False,
        seed: int = 0,
        pin: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 (B, C, S, S) batches of ``batch_sizes`` images and their positions, in ``order``."""
        decode = _Decode(self._paths, order.cpu().numpy(), self.mode, self.image_size, self.resize, train, flip, seed)
        starts = np.cumsum([0, *batch_sizes])
        loader = torch.utils.data.DataLoader(
            decode,
            batch_sampler=[list(range(int(a), int(b))) for a, b in zip(starts, starts[1:]) if b > a],
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=pin,
            # Its own generator, so that starting workers never draws from the global RNG.
            generator=torch.Generator().manual_seed(seed),
        )
        for x, idx, error in loader:
            if error is not None:
                raise UserError(error)
            yield x, idx

    def batches(
        self,
        indices: torch.Tensor,
        batch_size: int,
        *,
        mean: torch.Tensor,
        std: torch.Tensor,
        augment: Augment | None = None,
        shuffle: bool = False,
        order: Order | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        shard: tuple[int, int] | None = None,
    ) -> Iterator[ImageBatch]:
        device = torch.device(device)
        augment = None if augment is None or augment.is_identity else augment
        crop = augment is not None and augment.resized_crop
        # A seed for this pass, drawn first so that the per-sample crops follow the generator.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if augment is not None else 0
        indices = in_order(indices.to(torch.int64).cpu(), shuffle, order, generator)
        batch_aug = None if augment is None or crop else Augment(crop_pad=augment.crop_pad, flip=augment.flip)
        mean, std = to_device(mean, device), to_device(std, device)
        pin = device.type == "cuda"
        flip = crop and augment is not None and augment.flip
        # A rank decodes only its slice of each batch (each image's crop is seeded by its position).
        parts = _batch_parts(indices.numel(), batch_size, shard)
        mine = torch.cat([indices[s + lo : s + hi] for s, (lo, hi, _) in parts]) if parts else indices
        sizes = [hi - lo for _, (lo, hi, _) in parts]
        draws = None
        if batch_aug is not None and not batch_aug.is_identity:
            draws = draw_epoch(batch_aug, [size for _, (_, _, size) in parts], generator, device)
        decoded = self._decoded(mine, sizes, train=crop, flip=flip, seed=seed, pin=pin)
        empty = torch.empty((0, self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        for k, (_, part) in enumerate(parts):
            x, idx = next(decoded) if part[1] > part[0] else (empty, torch.empty(0, dtype=torch.int64))
            x = x.to(device, non_blocking=pin)
            if batch_aug is not None and draws is not None:
                x = augment_batch(x, batch_aug, draws.batch(k, part))
            yield normalise(x, mean, std), to_device(self.labels[idx], device), to_device(idx, device)

    def content_digest(self, indices: torch.Tensor) -> str:
        """sha256 over each image's path, size and modification time and its label: cheap
        (no decoding), and any rewritten or relabelled file changes it."""
        h = hashlib.sha256()
        h.update(f"{self.mode} {self.image_size} {self.resize}".encode())
        labels = self.labels[indices.cpu()].tolist()
        for i, label in zip(indices.cpu().tolist(), labels):
            path = self.paths[i]
            try:
                st = os.stat(path)
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
            except OSError as e:
                raise UserError(f"'{path}' cannot be read: {e.strerror or e}") from None
        return h.hexdigest()

    def channel_stats(self, indices: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(self.channels, dtype=torch.float64)
        squares = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        for x, _ in self._decoded(indices.to(torch.int64), batch_sizes(indices.numel(), batch_size)):
            x = x.to(torch.float64) / 255.0
            total += x.sum(dim=(0, 2, 3))
            squares += (x * x).sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        var = (squares - count * mean * mean) / max(count - 1, 1)
        return mean.float(), var.clamp_min(0).sqrt().float()

    def decode_all(self, batch_size: int = 256) -> torch.Tensor:
        """Every image (there must be at least one), eval-transformed, as one uint8 (N, C, S, S) tensor."""
        return torch.cat([x for x, _ in self._decoded(torch.arange(len(self)), batch_sizes(len(self), batch_size))])
