"""Image files decoded by Pillow: ImageNet-style folders (``imagefolder``) and list files (``listfile``).

:class:`FileImages` decodes in DataLoader workers. Training images get a random-resized crop
(the standard Inception / ImageNet recipe) and a flip; evaluation images are resized on their
shorter side and centre-cropped. Each sample's random numbers are seeded from (a seed drawn from
the caller's generator, the sample's position), so the crops do not depend on the worker count.

With ``data.in_memory`` the images are decoded once, at ``image_size``, into a
:class:`TensorImages` and trained with the small-image augmentation (pad-crop and flip).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cilkit.config import DataConfig
from cilkit.registry import register_source
from cilkit.data.base import Batch, Dataset, ImageSet, TensorImages
from cilkit.data.transforms import Augment, augment_batch, normalise
from cilkit.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DEFAULT_IMAGE_SIZE = 224
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


# --------------------------------------------------------------------------- per-image transforms


def open_image(path: str, mode: str) -> Image.Image:
    """Decode ``path`` fully into ``mode`` ('RGB' or 'L'); any failure is the file's fault."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except Exception as e:  # Pillow raises many types for bad files (OSError, SyntaxError, ...)
        raise UserError(f"cannot read image '{path}': {e}") from None


def image_mode(path: str) -> str:
    """'L' for a grayscale image, else 'RGB' (decided once per dataset, from its first image)."""
    try:
        with Image.open(path) as img:
            return "L" if img.mode in GRAY_MODES else "RGB"
    except Exception as e:
        raise UserError(f"cannot read image '{path}': {e}") from None


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
    return torch.stack([x for x, _, _ in items]), idx, None


class FileImages(ImageSet):
    """Images on disk, decoded by Pillow in ``workers`` DataLoader processes.

    ``image_size`` is the training crop and the evaluation crop; ``resize`` the evaluation
    resize of the shorter side (default ``round(image_size * 256 / 224)``, the ImageNet ratio).
    ``mode`` ('RGB' or 'L') defaults to that of the first image.
    """

    def __init__(
        self,
        paths: list[str],
        labels: torch.Tensor,
        *,
        image_size: int = DEFAULT_IMAGE_SIZE,
        resize: int | None = None,
        workers: int = 0,
        mode: str | None = None,
    ) -> None:
        if len(paths) != labels.numel():
            raise ValueError(f"{len(paths)} paths but {labels.numel()} labels")
        self.paths = list(paths)
        self.labels = labels.to(torch.int64).cpu()
        self.image_size = image_size
        self.resize = resize if resize is not None else round(image_size * 256 / 224)
        self.workers = workers
        self.mode = mode or (image_mode(self.paths[0]) if self.paths else "RGB")
        self._paths = np.array([os.fsencode(p) for p in self.paths], dtype=np.bytes_)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def _decoded(
        self,
        order: torch.Tensor,
        batch_size: int,
        *,
        train: bool = False,
        flip: bool = False,
        seed: int = 0,
        pin: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 (B, C, S, S) batches and their positions, in ``order``."""
        decode = _Decode(self._paths, order.cpu().numpy(), self.mode, self.image_size, self.resize, train, flip, seed)
        loader = torch.utils.data.DataLoader(
            decode,
            batch_size=batch_size,
            shuffle=False,
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
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[Batch]:
        device = torch.device(device)
        augment = None if augment is None or augment.is_identity else augment
        crop = augment is not None and augment.resized_crop
        # A seed for this pass, drawn first so that the per-sample crops follow the generator.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if augment is not None else 0
        indices = indices.to(torch.int64).cpu()
        if shuffle:
            indices = indices[torch.randperm(indices.numel(), generator=generator)]
        batch_aug = None if augment is None or crop else Augment(crop_pad=augment.crop_pad, flip=augment.flip)
        mean, std = mean.to(device), std.to(device)
        pin = device.type == "cuda"
        for x, idx in self._decoded(indices, batch_size, train=crop, flip=crop and augment.flip, seed=seed, pin=pin):
            x = x.to(device, non_blocking=pin)
            if batch_aug is not None:
                x = augment_batch(x, batch_aug, generator)
            yield normalise(x, mean, std), self.labels[idx].to(device), idx.to(device)

    def channel_stats(self, indices: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(self.channels, dtype=torch.float64)
        squares = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        for x, _ in self._decoded(indices.to(torch.int64), batch_size):
            x = x.to(torch.float64) / 255.0
            total += x.sum(dim=(0, 2, 3))
            squares += (x * x).sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        var = (squares - count * mean * mean) / max(count - 1, 1)
        return mean.float(), var.clamp_min(0).sqrt().float()

    def decode_all(self, batch_size: int = 256) -> torch.Tensor:
        """Every image (there must be at least one), eval-transformed, as one uint8 (N, C, S, S) tensor."""
        return torch.cat([x for x, _ in self._decoded(torch.arange(len(self)), batch_size)])


# --------------------------------------------------------------------------- readers


def _sizes(cfg: DataConfig) -> tuple[int, int]:
    size = cfg.image_size or DEFAULT_IMAGE_SIZE
    resize = cfg.resize if cfg.resize is not None else round(size * 256 / 224)
    if resize < size:
        raise UserError(f"config key 'data.resize': {resize} is smaller than data.image_size {size}")
    return size, resize


def _file_dataset(
    cfg: DataConfig, train: tuple[list[str], list[int]], test: tuple[list[str], list[int]], class_names: list[str]
) -> Dataset:
    """Build FileImages (or, with ``in_memory``, decoded TensorImages) train and test sets."""
    size, resize = _sizes(cfg)
    mode = image_mode(train[0][0])
    if cfg.in_memory:
        resize = size  # decode once at the training size: resize the shorter side, centre crop
    sets = [
        FileImages(
            paths,
            torch.tensor(labels, dtype=torch.int64),
            image_size=size,
            resize=resize,
            workers=cfg.workers,
            mode=mode,
        )
        for paths, labels in (train, test)
    ]
    if cfg.in_memory:
        train_set, test_set = (TensorImages(s.decode_all(), s.labels) for s in sets)
        augment = Augment(crop_pad=size // 8, flip=True)
    else:
        train_set, test_set = sets
        augment = Augment(flip=True, resized_crop=True)
    return Dataset(name=cfg.name, train=train_set, test=test_set, class_names=class_names, augment=augment)


def _images_under(folder: Path) -> list[str]:
    """Image files anywhere under ``folder``, sorted, skipping hidden files and folders."""
    found = []
    for p in folder.rglob("*"):
        hidden = any(part.startswith(".") for part in p.relative_to(folder).parts)
        if not hidden and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            found.append(str(p))
    return sorted(found)


def _scan_folder(folder: Path, class_ids: dict[str, int] | None) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of ``folder/<class>/**/<image>``; ids from ``class_ids`` if given."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UserError(f"'{folder}' has no class folders")
    if class_ids is None:
        class_ids = {name: i for i, name in enumerate(names)}
    paths: list[str] = []
    labels: list[int] = []
    for name in names:
        if name not in class_ids:
            raise UserError(f"'{folder / name}': class '{name}' is not among the training classes")
        images = _images_under(folder / name)
        if not images:
            raise UserError(f"'{folder / name}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += images
        labels += [class_ids[name]] * len(images)
    return paths, labels, names


@register_source("imagefolder", "image files in data.root/train/<class>/ and data.root/val/ (or test/)")
def read_imagefolder(cfg: DataConfig) -> Dataset:
    if cfg.root is None:
        raise UserError("data.root is required for imagefolder")
    root = Path(os.path.expanduser(cfg.root))
    if not (root / "train").is_dir():
        raise UserError(f"data.root '{cfg.root}': folder '{root / 'train'}' not found")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if test_dir is None:
        raise UserError(f"data.root '{cfg.root}': neither 'val/' nor 'test/' found")
    train_paths, train_labels, names = _scan_folder(root / "train", None)
    test_paths, test_labels, _ = _scan_folder(test_dir, {name: i for i, name in enumerate(names)})
    return _file_dataset(cfg, (train_paths, train_labels), (test_paths, test_labels), names)


def _label(parts: list[str]) -> int | None:
    """The class id of a split list line, or None when the line is not 'path label'."""
    if len(parts) != 2:
        return None
    try:
        label = int(parts[1])
    except ValueError:
        return None
    return label if label >= 0 else None


def parse_list_file(list_path: str, root: str | None, num_classes: int | None = None) -> tuple[list[str], list[int]]:
    """Read ``path label`` lines (blank lines skipped). Paths are relative to ``root`` or, when it
    is None, to the list file's folder. Labels must be in 0..num_classes-1 when that is given."""
    path = Path(os.path.expanduser(list_path))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read list file '{list_path}': {e}") from None
    base = Path(os.path.expanduser(root)) if root is not None else path.parent
    paths: list[str] = []
    labels: list[int] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        label = _label(parts)
        if label is None:
            raise UserError(
                f"{list_path} line {n}: expected 'path label' (a path and a class id >= 0), got {line.strip()!r}"
            )
        if num_classes is not None and label >= num_classes:
            raise UserError(f"{list_path} line {n}: label {label} is not a training class (0..{num_classes - 1})")
        image = base / parts[0]
        if not image.is_file():
            raise UserError(f"{list_path} line {n}: image '{image}' not found")
        paths.append(str(image))
        labels.append(label)
    if not paths:
        raise UserError(f"list file '{list_path}' lists no images")
    return paths, labels


@register_source("listfile", "images named in data.train_list / data.test_list ('relative/path label' per line)")
def read_listfile(cfg: DataConfig) -> Dataset:
    for key in ("train_list", "test_list"):
        if getattr(cfg, key) is None:
            raise UserError(f"data.{key} is required for listfile")
    if cfg.root is not None and not os.path.isdir(os.path.expanduser(cfg.root)):
        raise UserError(f"data.root '{cfg.root}': folder not found")
    train = parse_list_file(cfg.train_list, cfg.root)
    num_classes = max(train[1]) + 1
    test = parse_list_file(cfg.test_list, cfg.root, num_classes)
    return _file_dataset(cfg, train, test, [str(i) for i in range(num_classes)])
