"""What a checkpoint records of the data its states ran on, and what a resume says when it changed.

A run's checkpoints hold the data's :func:`fingerprint`: a digest of every training and test
image and label, in order (as every checkpoint has held it), and per split its own digest and
its image count per class. A resume on data that is not the same is refused
(:func:`data_change`), in one line naming the split that changed (its folder or list file) and,
where the counts tell, the class that gained or lost images: a deleted test image names the
test folder, not ``train/``.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import torch

from cilkit.data.base import Dataset

SPLITS = ("train", "test")
SPLIT_WORDS = {"train": "training", "test": "test"}


def fingerprint(dataset: Dataset) -> dict[str, Any]:
    """``{"digest": ..., "splits": {"train": {"digest": ..., "per_class": [...]}, "test": ...}}``:
    ``digest`` is the one a checkpoint has always held (sha256 of the two splits' content
    digests), ``per_class`` the image count of each class id."""
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        images = getattr(dataset, split)
        counts = torch.bincount(images.labels, minlength=dataset.num_classes)
        splits[split] = {"digest": images.content_digest(torch.arange(len(images))), "per_class": counts.tolist()}
    digest = hashlib.sha256("\0".join(splits[s]["digest"] for s in SPLITS).encode()).hexdigest()
    return {"digest": digest, "splits": splits}


def recorded_digest(recorded: str | dict[str, Any]) -> str:
    """The whole-data digest of a checkpoint's record (a bare digest before the splits were kept)."""
    return recorded if isinstance(recorded, str) else str(recorded.get("digest"))


class DataChange(NamedTuple):
    """What a resume says of data that changed: ``subject`` (``the test split in '<folder>'``)
    and ``detail`` (``class 'cat' has 2 test images, it had 3``)."""

    subject: str
    detail: str


def data_change(recorded: str | dict[str, Any] | None, dataset: Dataset, now: dict[str, Any]) -> DataChange | None:
    """What changed between the data a checkpoint ``recorded`` and the data now (``now``, its
    :func:`fingerprint`); None when nothing did, or nothing was recorded (cilkit 0.1.0)."""
    if recorded is None or recorded_digest(recorded) == now["digest"]:
        return None
    splits = recorded.get("splits") if isinstance(recorded, dict) else None
    if not isinstance(splits, dict):  # a checkpoint that kept the whole digest alone
        return DataChange("the data in " + " and ".join(f"'{_where(dataset, s)}'" for s in SPLITS),
                          "its images, labels or order changed")
    changed = [s for s in SPLITS if (splits.get(s) or {}).get("digest") != now["splits"][s]["digest"]] or list(SPLITS)
    details = [_detail(dataset, s, (splits.get(s) or {}).get("per_class"), now["splits"][s]["per_class"])
               for s in changed]
    return DataChange(" and ".join(f"the {s} split in '{_where(dataset, s)}'" for s in changed),
                      details[0] if len(details) == 1 else "; ".join(f"{s}: {d}" for s, d in zip(changed, details)))


def _where(dataset: Dataset, split: str) -> str:
    return dataset.origin.get(split) or f"dataset '{dataset.name}'"


def _detail(dataset: Dataset, split: str, before: Any, after: list[int]) -> str:
    """How a split changed: the first class whose image count changed, where one did."""
    if not isinstance(before, list):
        return "its images, labels or order changed"
    if len(before) != len(after):
        return f"{len(after)} classes, it had {len(before)}"
    differ = [c for c, (a, b) in enumerate(zip(after, before)) if a != b]
    if not differ:
        return "an image, a label or the order changed; the images per class are as many"
    c = differ[0]
    more = f", and {len(differ) - 1} more class(es) changed" if len(differ) > 1 else ""
    return f"class '{dataset.class_names[c]}' has {after[c]} {SPLIT_WORDS[split]} images, it had {before[c]}{more}"
