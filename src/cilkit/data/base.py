"""The data contract: image sets that batch themselves, and a dataset = train + test + facts.

Two kinds of image set:
- :class:`TensorImages`: small images held in memory as one uint8 tensor (N, C, H, W), moved
  once to the training device; batches are index lookups, augmentation is batched tensor ops.
- :class:`FileImages` (in ``cilkit.data.files``): large images decoded by Pillow in DataLoader
  workers (ImageNet-style folders and list files).

Both yield ``(x, y, idx)``: ``x`` float32 normalised on the device, ``y`` the ORIGINAL class ids
(int64, on the device) and ``idx`` the positions in the set (int64, on the device). Selecting a
subset (a state's classes, the memory, an annotated pool) is just an index tensor.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from typing import Any

import torch

from cilkit.data.transforms import Augment, augment_batch, draw_epoch, normalise, to_device
from cilkit.common.distributed import shard_bounds

ImageBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x, original labels, indices)
Order = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]  # an epoch's order of indices


def shuffled(indices: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``indices`` in a random order drawn from ``generator`` (the default order of a training epoch)."""
    return indices[torch.randperm(indices.numel(), generator=generator)]


def in_order(indices: torch.Tensor, shuffle: bool, order: Order | None, generator: torch.Generator | None) -> torch.Tensor:
    """``indices`` as :meth:`ImageSet.batches` takes them: in ``order``, else shuffled if asked."""
    if order is None and shuffle:
        order = shuffled
    return indices if order is None else order(indices, generator)


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The sizes of the batches :meth:`ImageSet.batches` makes of ``n`` images (the last one smaller)."""
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


class ImageSet(ABC):
    """Labelled images addressed by position. Subclasses implement :meth:`batches`."""

    labels: torch.Tensor  # int64 (N,), original class ids 0..C-1, on CPU

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device | str) -> "ImageSet":
        return self

    @abstractmethod
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
        """Yield ``(x, y, idx)`` over ``indices``, in ``order(indices, generator)`` when given
        (``shuffle``: :func:`shuffled`), drawn before any augmentation draws. With
        ``shard=(rank, world)`` each batch is that rank's slice (:func:`~cilkit.common.distributed.
        shard_bounds`) of the batch one process would get, augmented as one process would
        augment it: a data-parallel rank's share of the global batch."""

    @property
    @abstractmethod
    def geometry(self) -> tuple[int, int]:
        """(channels, side) of the images :meth:`batches` yields (square), without decoding any."""

    @abstractmethod
    def channel_stats(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std (in [0, 1] units) of the images at ``indices``."""

    @abstractmethod
    def content_digest(self, indices: torch.Tensor) -> str:
        """A digest that changes when an image or a label at ``indices`` changes (part of the
        state-0 cache key: a cached model is reused only for the same data)."""


class Rows:
    """Rows of cached inputs (features, logits) with their labels (original class ids), batched
    like an image set, for a fit over them (:meth:`cilkit.training.engine.Engine.fit` with ``data=``:
    BiC's bias layer over the validation logits). No augmentation, no normalisation, no shard:
    every process holds the same rows."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"{inputs.shape[0]} rows but {labels.shape[0]} labels")
        self.inputs, self.labels = inputs, labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def batches(self, indices: torch.Tensor, batch_size: int, *, order: Order | None = None,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                **_: Any) -> Iterator[ImageBatch]:
        """``(rows, labels, idx)`` over ``indices`` in ``order(indices, generator)`` (as given without one)."""
        ordered = order(indices, generator) if order is not None else indices
        for start in range(0, ordered.numel(), batch_size):
            idx = ordered[start: start + batch_size]
            yield self.inputs[idx].to(device), self.labels[idx].to(device), idx


class TensorImages(ImageSet):
    """Images in memory as one uint8 tensor (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"TensorImages wants uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels.to(torch.int64).cpu()
        self._labels_dev = self.labels

    @property
    def geometry(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[-1])

    def to(self, device: torch.device | str) -> "TensorImages":
        device = torch.device(device)
        if self.images.device != device:
            self.images = self.images.to(device)
            self._labels_dev = self.labels.to(device)
        return self

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
        self.to(device)
        dev = self.images.device
        indices = in_order(indices.to(torch.int64), shuffle, order, generator)
        augment = None if augment is None or augment.is_identity else augment
        draws = draw_epoch(augment, batch_sizes(indices.numel(), batch_size), generator, dev) if augment else None
        indices = to_device(indices, dev)
        mean, std = to_device(mean, dev), to_device(std, dev)
        for k, start in enumerate(range(0, indices.numel(), batch_size)):
            idx = indices[start : start + batch_size]
            part = None
            if shard is not None:
                lo, hi = shard_bounds(idx.numel(), *shard)
                part, idx = (lo, hi, idx.numel()), idx[lo:hi]
            x = self.images[idx]
            if augment is not None and draws is not None:
                x = augment_batch(x, augment, draws.batch(k, part))
            yield normalise(x, mean, std), self._labels_dev[idx], idx

    def content_digest(self, indices: torch.Tensor) -> str:
        """sha256 of the images and labels at ``indices`` (the uint8 pixels themselves)."""
        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape[1:])).encode())
        h.update(self.labels[indices.cpu()].numpy().tobytes())
        for start in range(0, indices.numel(), 8192):  # bounded host copies for device-resident data
            chunk = indices[start : start + 8192].to(self.images.device)
            h.update(self.images[chunk].cpu().numpy().tobytes())
        return h.hexdigest()

    def channel_stats(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[indices.to(self.images.device)].to(torch.float64) / 255.0
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3))
        return mean.float().cpu(), std.float().cpu()


@dataclass
class Dataset:
    """A train set, a test set and what a run must know about them.

    ``mean``/``std`` are None when the dataset has no known statistics: the runner then
    computes them from the training images of state 0 (as the IL2M / active-IL seeds say).
    ``augment`` is the dataset's default training augmentation. ``origin`` names, per split
    ('train', 'test'), the file or folder its labels come from (for error messages);
    ``notes`` are the decisions taken while loading (channels, image size, skipped files),
    one short sentence each, for the runner to show.
    """

    name: str
    train: ImageSet
    test: ImageSet
    class_names: list[str]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: Augment = field(default_factory=Augment)
    origin: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_labels(self) -> None:
        """Raise a clear error for a label outside 0..num_classes-1 or a class without images
        in either split (a partial copy of a dataset would otherwise train on empty classes)."""
        from cilkit.common.errors import UserError

        for split, s in (("train", self.train), ("test", self.test)):
            where = self.origin.get(split)
            where = f"'{where}'" if where else f"dataset '{self.name}'"
            if len(s) == 0:
                raise UserError(f"{where}: the {split} split is empty")
            lo, hi = int(s.labels.min()), int(s.labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise UserError(
                    f"{where}: {split} label {hi if hi >= self.num_classes else lo} "
                    f"is outside 0..{self.num_classes - 1}"
                )
            counts = torch.bincount(s.labels, minlength=self.num_classes)
            empty = (counts == 0).nonzero().flatten().tolist()
            if empty:
                c = empty[0]
                others = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
                kind = "training" if split == "train" else "test"
                raise UserError(f"{where}: class {c} ('{self.class_names[c]}') has no {kind} images{others}")
