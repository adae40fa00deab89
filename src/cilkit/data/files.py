"""Image files decoded by Pillow: ImageNet-style folders (``imagefolder``) and list files (``listfile``).

:class:`FileImages` decodes in DataLoader workers. Training images get a random-resized crop
(the standard Inception / ImageNet recipe) and a flip; evaluation images are resized on their
shorter side and centre-cropped. Each sample's random numbers are seeded from (a seed drawn from
the caller's generator, the sample's position), so the crops do not depend on the worker count.

With ``data.in_memory`` the images are decoded once, at ``image_size``, into a
:class:`TensorImages` and trained with the small-image augmentation (pad-crop and flip).

Both readers check the whole dataset when it is loaded (see ``cilkit.data.checks``): labels
0..C-1 with training and test images for every class, every file present and decodable. The
images keep their own size unless ``data.image_size`` is set, and the channel count is decided
from all checked images (or ``data.channels``); the decisions are in ``Dataset.notes``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cilkit.config import DataConfig
from cilkit.registry import register_source
from cilkit.data.base import Batch, Dataset, ImageSet, TensorImages
from cilkit.data.checks import ImageFacts, check_images, choose_mode, native_size
from cilkit.data.transforms import Augment, Part, augment_batch, normalise
from cilkit.distributed import shard_bounds
from cilkit.errors import UserError, reason

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DEFAULT_IMAGE_SIZE = 224


# --------------------------------------------------------------------------- per-image transforms


def open_image(path: str, mode: str) -> Image.Image:
    """Decode ``path`` fully into ``mode`` ('RGB' or 'L'); any failure is the file's fault."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
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
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        shard: tuple[int, int] | None = None,
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
        flip = crop and augment is not None and augment.flip
        # A rank decodes only its slice of each batch (each image's crop is seeded by its position).
        parts = _batch_parts(indices.numel(), batch_size, shard)
        mine = torch.cat([indices[s + lo : s + hi] for s, (lo, hi, _) in parts]) if parts else indices
        sizes = [hi - lo for _, (lo, hi, _) in parts]
        decoded = self._decoded(mine, sizes, train=crop, flip=flip, seed=seed, pin=pin)
        empty = torch.empty((0, self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        for _, part in parts:
            x, idx = next(decoded) if part[1] > part[0] else (empty, torch.empty(0, dtype=torch.int64))
            x = x.to(device, non_blocking=pin)
            if batch_aug is not None:
                x = augment_batch(x, batch_aug, generator, part)
            yield normalise(x, mean, std), self.labels[idx].to(device), idx.to(device)

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
        for x, _ in self._decoded(indices.to(torch.int64), _even(indices.numel(), batch_size)):
            x = x.to(torch.float64) / 255.0
            total += x.sum(dim=(0, 2, 3))
            squares += (x * x).sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        var = (squares - count * mean * mean) / max(count - 1, 1)
        return mean.float(), var.clamp_min(0).sqrt().float()

    def decode_all(self, batch_size: int = 256) -> torch.Tensor:
        """Every image (there must be at least one), eval-transformed, as one uint8 (N, C, S, S) tensor."""
        return torch.cat([x for x, _ in self._decoded(torch.arange(len(self)), _even(len(self), batch_size))])


# --------------------------------------------------------------------------- readers


@dataclass
class ImageList:
    """The images of one split as a reader found them: paths, class ids, and for messages the
    list file or folder they come from (with each path's line number for list files)."""

    paths: list[str]
    labels: list[int]
    source: str
    lines: list[int] | None = None

    def where(self, k: int) -> str:
        """'<list> line <n>: ' for the ``k``-th image of a list file, '' for a folder."""
        return f"{self.source} line {self.lines[k]}: " if self.lines is not None else ""


def _even(n: int, batch_size: int) -> list[int]:
    """Batch sizes of ``n`` images in batches of ``batch_size`` (the last one smaller)."""
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def _batch_parts(n: int, batch_size: int, shard: tuple[int, int] | None) -> list[tuple[int, Part]]:
    """Per batch of ``n`` positions: its start and the rows ``(lo, hi, size)`` this rank takes."""
    out = []
    for start, size in zip(range(0, n, batch_size), _even(n, batch_size)):
        lo, hi = shard_bounds(size, *shard) if shard is not None else (0, size)
        out.append((start, (lo, hi, size)))
    return out


def _sizes(cfg: DataConfig, facts: ImageFacts | None, paths: list[str]) -> tuple[int, int, str]:
    """(crop size, eval resize, note): ``data.image_size`` if set (``facts`` unused, may be None:
    then a bad data.resize is reported before any file is decoded), else the images' own size."""
    if cfg.image_size is not None:
        size = cfg.image_size
        resize = cfg.resize if cfg.resize is not None else round(size * 256 / 224)
        note = f"image size: {size} (data.image_size; eval resize {resize})"
    else:
        assert facts is not None
        width, height = native_size(facts, paths)
        size = min(width, height)
        resize = cfg.resize if cfg.resize is not None else size
        crop = "" if width == height else f", centre crops of {size}x{size}"
        note = f"image size: {width}x{height} as stored{crop} (data.image_size unset)"
    if resize < size:
        raise UserError(f"config key 'data.resize': {resize} is smaller than the image size {size}")
    return size, resize, note


def _file_dataset(
    cfg: DataConfig, train: ImageList, test: ImageList, class_names: list[str], notes: list[str]
) -> Dataset:
    """Check every image (see ``cilkit.data.checks``), decide channels and size, and build
    FileImages (or, with ``in_memory``, decoded TensorImages) train and test sets."""
    paths = train.paths + test.paths
    n_train = len(train.paths)
    groups = np.concatenate([np.asarray(train.labels), np.asarray(test.labels) + len(class_names)])

    def where(i: int) -> str:
        return train.where(i) if i < n_train else test.where(i - n_train)

    if cfg.image_size is not None:
        _sizes(cfg, None, paths)
    facts = check_images(paths, groups, quick=cfg.check == "quick", workers=cfg.workers, where=where)
    mode, mode_note = choose_mode(facts, cfg.channels)
    size, resize, size_note = _sizes(cfg, facts, paths)
    if cfg.in_memory:
        resize = size  # decode once at the training size: resize the shorter side, centre crop
    sets = [
        FileImages(
            images.paths,
            torch.tensor(images.labels, dtype=torch.int64),
            image_size=size,
            resize=resize,
            workers=cfg.workers,
            mode=mode,
        )
        for images in (train, test)
    ]
    train_set: ImageSet
    test_set: ImageSet
    if cfg.in_memory:
        train_set, test_set = (TensorImages(s.decode_all(), s.labels) for s in sets)
        augment = Augment(crop_pad=size // 8, flip=True)
    else:
        train_set, test_set = sets
        augment = Augment(flip=True, resized_crop=True)
    return Dataset(
        name=cfg.name,
        train=train_set,
        test=test_set,
        class_names=class_names,
        augment=augment,
        origin={"train": train.source, "test": test.source},
        notes=[mode_note, size_note, *notes],
    )


def _images_under(folder: Path) -> tuple[list[str], list[str]]:
    """Image files anywhere under ``folder``, sorted, and the other (skipped) files; hidden
    files and folders are ignored altogether."""
    found: list[str] = []
    skipped: list[str] = []
    for p in folder.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(folder).parts) or not p.is_file():
            continue
        (found if p.suffix.lower() in IMAGE_EXTENSIONS else skipped).append(str(p))
    return sorted(found), sorted(skipped)


def _scan_folder(folder: Path, split: str, classes: list[str] | None) -> tuple[ImageList, list[str], list[str]]:
    """The images of ``folder/<class>/**/<image>`` with their class ids, the class names and
    the skipped non-image files. ``classes``: the training classes, every one of which must
    have a folder with images here; None (the training split): the folders found."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UserError(f"'{folder}' has no class folders")
    if classes is None:
        classes = names
    ids = {name: i for i, name in enumerate(classes)}
    for name in names:
        if name not in ids:
            raise UserError(f"'{folder / name}': class '{name}' is not among the training classes")
    for name in classes:
        if name not in names:
            raise UserError(f"class '{name}' has no {split} images: '{folder / name}' not found")
    paths: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    for name in names:
        images, others = _images_under(folder / name)
        if not images:
            raise UserError(
                f"class '{name}' has no {split} images: '{folder / name}' holds no image files "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += images
        labels += [ids[name]] * len(images)
        skipped += others
    return ImageList(paths, labels, str(folder)), classes, skipped


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
    train, names, skipped = _scan_folder(root / "train", "training", None)
    test, _, skipped_test = _scan_folder(test_dir, "test", names)
    skipped += skipped_test
    notes = []
    if skipped:
        notes.append(f"skipped {len(skipped)} file(s) without an image extension, e.g. '{skipped[0]}'")
    return _file_dataset(cfg, train, test, names, notes)


def _label(parts: list[str]) -> int | None:
    """The class id of a split list line, or None when the line is not 'path label'."""
    if len(parts) != 2:
        return None
    try:
        label = int(parts[1])
    except ValueError:
        return None
    return label if label >= 0 else None


def list_path(value: str, root: str | None) -> Path:
    """Where a ``data.train_list`` / ``data.test_list`` value points: absolute as given, relative
    to ``data.root`` when that is set, else to the working directory."""
    path = Path(os.path.expanduser(value))
    if path.is_absolute() or root is None:
        return path
    return Path(os.path.expanduser(root)) / path


def parse_list_file(list_file: Path, root: str | None, num_classes: int | None = None) -> ImageList:
    """Read ``path label`` lines (blank lines skipped). Image paths are relative to ``root`` or,
    when it is None, to the list file's folder; each must exist. Labels must be in
    0..num_classes-1 when that is given."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read list file '{list_file}': {reason(e)}") from None
    base = Path(os.path.expanduser(root)) if root is not None else list_file.parent
    paths: list[str] = []
    labels: list[int] = []
    numbers: list[int] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        label = _label(parts)
        if label is None:
            raise UserError(
                f"{list_file} line {n}: expected 'path label' (a path and a class id >= 0), got {line.strip()!r}"
            )
        if num_classes is not None and label >= num_classes:
            raise UserError(f"{list_file} line {n}: label {label} is not a training class (0..{num_classes - 1})")
        image = base / parts[0]
        if not image.is_file():
            raise UserError(f"{list_file} line {n}: image '{image}' not found")
        paths.append(str(image))
        labels.append(label)
        numbers.append(n)
    if not paths:
        raise UserError(f"list file '{list_file}' lists no images")
    return ImageList(paths, labels, str(list_file), numbers)


def _class_list(ids: np.ndarray) -> str:
    """'class 3', 'classes 3, 5', 'classes 3..98' (runs of consecutive ids shortened)."""
    runs: list[str] = []
    start = prev = int(ids[0])
    for c in [*map(int, ids[1:]), None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        runs.append(str(start) if start == prev else f"{start}..{prev}")
        if c is not None:
            start = prev = c
    return ("class " if ids.size == 1 else "classes ") + ", ".join(runs)


def _training_classes(train: ImageList) -> int:
    """The class count C of a training list, whose labels must be exactly 0..C-1 (a gap would
    leave classes without training images)."""
    labels = np.asarray(train.labels)
    present = np.unique(labels)
    num_classes = int(present.size)
    if present[-1] >= num_classes:
        k = int(np.flatnonzero(labels >= num_classes)[0])
        missing = np.setdiff1d(np.arange(present[-1]), present)
        raise UserError(
            f"{train.where(k)}label {labels[k]} leaves {_class_list(missing)} without training images "
            f"(labels must run 0..C-1 without gaps; this list has {num_classes} distinct labels)"
        )
    return num_classes


def _check_test_classes(test: ImageList, train_list: Path, num_classes: int) -> None:
    counts = np.bincount(np.asarray(test.labels), minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        verb = "has" if missing.size == 1 else "have"
        raise UserError(
            f"{test.source}: {_class_list(missing)} of '{train_list}' {verb} no test images "
            "(every class needs some)"
        )


@register_source("listfile", "images named in data.train_list / data.test_list ('path label' per line)")
def read_listfile(cfg: DataConfig) -> Dataset:
    if cfg.train_list is None or cfg.test_list is None:
        key = "train_list" if cfg.train_list is None else "test_list"
        raise UserError(f"data.{key} is required for listfile")
    if cfg.root is not None and not os.path.isdir(os.path.expanduser(cfg.root)):
        raise UserError(f"data.root '{cfg.root}': folder not found")
    files: dict[str, Path] = {}
    for key, value in (("train_list", cfg.train_list), ("test_list", cfg.test_list)):
        path = list_path(value, cfg.root)
        if not path.is_file():
            hint = ""
            if path != Path(value) and Path(value).is_file():
                hint = f"; a relative list is read from data.root, give '{Path(value).resolve()}' to use the one here"
            raise UserError(f"config key 'data.{key}': list file '{path}' not found{hint}")
        files[key] = path
    train = parse_list_file(files["train_list"], cfg.root)
    num_classes = _training_classes(train)
    test = parse_list_file(files["test_list"], cfg.root, num_classes)
    _check_test_classes(test, files["train_list"], num_classes)
    return _file_dataset(cfg, train, test, [str(i) for i in range(num_classes)], [])
