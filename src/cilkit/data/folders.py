"""Readers of image files: ImageNet-style folders (``imagefolder``) and list files (``listfile``).

Both readers are registered with ``@register_source`` and check the whole dataset when it is
loaded (see ``cilkit.data.checks``): labels 0..C-1 with training and test images for every
class, every file present and decodable. They build :class:`~cilkit.data.files.FileImages`
train and test sets; with ``data.in_memory`` the images are decoded once, at ``image_size``,
into a :class:`TensorImages` and trained with the small-image augmentation (pad-crop and
flip). The images keep their own size unless ``data.image_size`` is set, and the channel count
is decided from all checked images (or ``data.channels``); the decisions are in ``Dataset.notes``.
A list file's labels are class ids 0..C-1 or class names (class k: the k-th name in sorted
order); an imagefolder without ``val/`` or ``test/`` splits its test set off ``train/`` when
``data.test_fraction`` is set (fixed and stratified, as digits' split).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cilkit.settings.config import DataConfig
from cilkit.settings.registry import register_source
from cilkit.data.base import Dataset, ImageSet, TensorImages
from cilkit.data.checks import ImageFacts, check_images, choose_mode, native_size
from cilkit.data.files import FileImages
from cilkit.data.sources import _root_folder, stratified_split
from cilkit.data.transforms import Augment
from cilkit.common.errors import UserError, did_you_mean, reason

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


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


@register_source("imagefolder", "image files in data.root/train/<class>/ and data.root/val/ (or test/), or a "
                 "data.test_fraction of train/ split off")
def read_imagefolder(cfg: DataConfig) -> Dataset:
    root = _root_folder(cfg)
    if not (root / "train").is_dir():
        raise UserError(f"data.root '{cfg.root}': folder '{root / 'train'}' not found")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if test_dir is None and cfg.test_fraction is None:
        raise UserError(f"data.root '{cfg.root}': neither 'val/' nor 'test/' found (set data.test_fraction, "
                        "e.g. 0.2, to split a fixed, stratified test set off train/)")
    train, names, skipped = _scan_folder(root / "train", "training", None)
    notes = []
    if test_dir is not None:
        test, _, skipped_test = _scan_folder(test_dir, "test", names)
        skipped += skipped_test
        if cfg.test_fraction is not None:  # (a run of cilkit <= 0.1.0 recorded 0.2 for every source)
            notes.append(f"data.test_fraction unused: the test images are those of '{test_dir}'")
    else:
        assert cfg.test_fraction is not None
        train, test = _split_off_test(train, names, cfg.test_fraction)
        notes.append(f"test set: {len(test.paths)} images split off train/ (data.test_fraction {cfg.test_fraction}, "
                     "stratified, the same for every seed)")
    if skipped:
        notes.append(f"skipped {len(skipped)} file(s) without an image extension, e.g. '{skipped[0]}'")
    return _file_dataset(cfg, train, test, names, notes)


def _split_off_test(train: ImageList, names: list[str], fraction: float) -> tuple[ImageList, ImageList]:
    """The fixed, stratified split of digits (:func:`cilkit.data.sources.stratified_split`)
    of a training folder: every class needs two images, one on each side."""
    labels = np.asarray(train.labels)
    counts = np.bincount(labels, minlength=len(names))
    if counts.min() < 2:
        name = names[int(counts.argmin())]
        raise UserError(f"config key 'data.test_fraction': class '{name}' has {counts.min()} image in "
                        f"'{Path(train.source) / name}', too few to split off a test image (2 at least)")
    source = f"{train.source} (data.test_fraction {fraction})"

    def part(indices: np.ndarray) -> ImageList:
        return ImageList([train.paths[i] for i in indices], [train.labels[i] for i in indices], source)

    kept, held = stratified_split(labels, fraction)
    return part(kept), part(held)


def _token(parts: list[str]) -> str | None:
    """The label of a split list line, or None when the line is not 'path label' (a last word
    that looks like an image file is a path with a space and no label, not a class name)."""
    if len(parts) != 2 or parts[1].lower().endswith(IMAGE_EXTENSIONS):
        return None
    return parts[1]


def _is_id(token: str) -> bool:
    """Only ASCII decimal digits are a class id: ``int()`` would also read '0_3' as 3, '+3', and
    other scripts' digits."""
    return token.isascii() and token.isdigit()


def list_path(value: str, root: str | None) -> Path:
    """Where a ``data.train_list`` / ``data.test_list`` value points: absolute as given, relative
    to ``data.root`` when that is set, else to the working directory."""
    path = Path(os.path.expanduser(value))
    if path.is_absolute() or root is None:
        return path
    return Path(os.path.expanduser(root)) / path


def parse_list_file(
    list_file: Path, root: str | None, num_classes: int | None = None, classes: list[str] | None = None
) -> tuple[ImageList, list[str] | None]:
    """Read ``path label`` lines (blank lines skipped). Image paths are relative to ``root`` or,
    when it is None, to the list file's folder; each must exist. A label is a class id (ASCII
    digits) or a class name, one kind per file: the first line's, or for a test list the
    training list's (``classes``: its sorted names, None when it gives ids). Ids must be in
    0..num_classes-1 and names among ``classes`` when those are given. Returns the images, names
    mapped to their index in the sorted names (``classes``, or this list's own), and those
    names (None for a list of ids)."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read list file '{list_file}': {reason(e)}") from None
    base = Path(os.path.expanduser(root)) if root is not None else list_file.parent
    named = None if num_classes is None and classes is None else classes is not None
    like = "as in the training list"  # the label kind the lines must have, for the message
    paths: list[str] = []
    tokens: list[str] = []
    numbers: list[int] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        token = _token(parts)
        if token is None:
            raise UserError(f"{list_file} line {n}: expected 'path label' (a path and a class id >= 0 or a "
                            f"class name), got {line.strip()!r}")
        if named is None:
            named, like = not _is_id(token), f"as on line {n} ({token!r})"
        elif named == _is_id(token):
            raise UserError(f"{list_file} line {n}: expected 'path label' with a class {'name' if named else 'id'} "
                            f"{like}, got {line.strip()!r} (the labels are all class ids 0..C-1 or all class names)")
        if not named and num_classes is not None and int(token) >= num_classes:
            raise UserError(f"{list_file} line {n}: label {token} is not a training class (0..{num_classes - 1})")
        if named and classes is not None and token not in classes:
            hint = did_you_mean(token, classes)
            raise UserError(f"{list_file} line {n}: class '{token}' is not a training class"
                            + (f": {hint}" if hint else "") + f" (the training list names {len(classes)})")
        image = base / parts[0]
        if not image.is_file():
            raise UserError(f"{list_file} line {n}: image '{image}' not found")
        paths.append(str(image))
        tokens.append(token)
        numbers.append(n)
    if not paths:
        raise UserError(f"list file '{list_file}' lists no images")
    if not named:
        return ImageList(paths, [int(t) for t in tokens], str(list_file), numbers), None
    names = classes if classes is not None else sorted(set(tokens))
    index = {name: i for i, name in enumerate(names)}
    return ImageList(paths, [index[t] for t in tokens], str(list_file), numbers), names


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


def _check_test_classes(test: ImageList, train_list: Path, num_classes: int, names: list[str] | None) -> None:
    counts = np.bincount(np.asarray(test.labels), minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        verb = "has" if missing.size == 1 else "have"
        which = _class_list(missing) if names is None else (
            ("class " if missing.size == 1 else "classes ") + ", ".join(repr(names[i]) for i in missing[:10])
            + (", ..." if missing.size > 10 else ""))
        raise UserError(f"{test.source}: {which} of '{train_list}' {verb} no test images (every class needs some)")


@register_source("listfile", "images named in data.train_list / data.test_list ('path label' per line, a class id "
                 "or name)")
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
    train, names = parse_list_file(files["train_list"], cfg.root)
    num_classes = _training_classes(train)  # names: their indices, 0..C-1 by construction
    test, _ = parse_list_file(files["test_list"], cfg.root, num_classes, names)
    _check_test_classes(test, files["train_list"], num_classes, names)
    return _file_dataset(cfg, train, test, names or [str(i) for i in range(num_classes)], [])
