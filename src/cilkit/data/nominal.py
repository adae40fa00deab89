"""The published sizes of the datasets cilkit's configs name, for what is said without the
data (``cilkit reproduce --list``'s compute estimate): how many classes, and how many training
images each class has as released. Nothing here is read from files, and no reader uses it.

A config of a built-in reader is looked up by ``data.name``; the image-file readers
(``imagefolder``, ``listfile``) hold any dataset, so theirs is looked up by the dataset its
config is named after (``lucir-imagenet-subset``: ImageNet-Subset). Synthetic data is sized by
its own keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from cilkit.settings.config import RunConfig

FILE_READERS = ("imagefolder", "listfile")


@dataclass(frozen=True)
class NominalSize:
    """``classes`` and the training images per class of a dataset as released."""

    name: str
    classes: int
    train_per_class: int


# Training images per class as published. CIFAR: 50,000 training images (Krizhevsky, 2009),
# 5,000 per class for CIFAR-10 and 500 for CIFAR-100. (Fashion-)MNIST: 60,000, 6,000 per class
# (MNIST's classes hold 5,421 to 6,742: 6,000 on average). ImageNet (ILSVRC-2012): 1,281,167
# images of 1,000 classes, 732 to 1,300 each; the 100-class subsets of LUCIR and PODNet
# (seed 1993) hold about 1,300 per class. Food-101 (Bossard et al., ECCV 2014): 101 classes of
# 1,000 images, 750 of them for training.
NOMINAL_SIZES: dict[str, NominalSize] = {s.name: s for s in (
    NominalSize("cifar10", 10, 5000),
    NominalSize("cifar100", 100, 500),
    NominalSize("mnist", 10, 6000),
    NominalSize("fashion-mnist", 10, 6000),
    NominalSize("imagenet-subset", 100, 1300),
    NominalSize("imagenet", 1000, 1281),
    NominalSize("food101", 101, 750),
)}


def nominal_size(config: RunConfig) -> NominalSize | None:
    """The published size of the dataset ``config`` reads; None where it is not known without
    the data (a plugin's reader, image files of a dataset its name does not say)."""
    data = config.data
    if data.name == "synthetic":
        return NominalSize("synthetic", data.synthetic.num_classes, data.synthetic.train_per_class)
    if data.name in FILE_READERS:
        named = [key for key in NOMINAL_SIZES if key in (config.name or "")]
        return NOMINAL_SIZES[max(named, key=len)] if named else None  # imagenet-subset before imagenet
    return NOMINAL_SIZES.get(data.name)
