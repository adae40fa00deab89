"""Data sources: a registry of readers, each turning a :class:`DataConfig` into a :class:`Dataset`.

A reader is registered with :func:`register_source`; :func:`load_dataset` looks it up by
``data.name``, applies the config's statistics / augmentation overrides and checks the labels
(range, and images of every class in both splits). Here live the image sets (``base``,
``files``), the readers (``sources``: digits, IDX and synthetic data in memory; ``cifar``: the CIFAR
pickles; ``folders``: image folders and list
files), the checks of image files and the augmentations (``transforms``); ``nominal``: the datasets'
published sizes (for estimates made without the data).

The package may import only the top-level modules ``errors``, ``config``, ``registry``, ``machine``,
``distributed`` and ``io``; never ``methods``, ``run`` or ``analysis``.
"""

from __future__ import annotations

import dataclasses

from cilkit.settings.config import DataConfig
from cilkit.data import cifar, files, folders, sources  # the readers register themselves
from cilkit.data.base import Dataset
from cilkit.common.errors import UserError, unknown_name
from cilkit.settings.registry import SOURCE_DESCRIPTIONS, SOURCES, call_plugin, register_source


def load_dataset(cfg: DataConfig) -> Dataset:
    """Read the dataset named by ``cfg.name``, apply the overrides of ``cfg``, check its labels."""
    reader = SOURCES.get(cfg.name)
    if reader is None:
        raise UserError(f"config key 'data.name': {unknown_name('dataset', cfg.name, SOURCES, plugin=True)}")
    dataset = call_plugin(reader, f"config key 'data.name': dataset '{cfg.name}'", cfg)
    channels = dataset.train.geometry[0]
    if cfg.mean is not None:
        dataset.mean = _stats_override("data.mean", cfg.mean, channels, positive=False)
    if cfg.std is not None:
        dataset.std = _stats_override("data.std", cfg.std, channels, positive=True)
    if cfg.crop_pad is not None:
        dataset.augment = dataclasses.replace(dataset.augment, crop_pad=cfg.crop_pad)
    if cfg.flip is not None:
        dataset.augment = dataclasses.replace(dataset.augment, flip=cfg.flip)
    dataset.check_labels()
    return dataset


def _stats_override(key: str, values: list[float], channels: int | None, *, positive: bool) -> tuple[float, ...]:
    if channels is not None and len(values) != channels:
        raise UserError(f"config key '{key}': {len(values)} values given but the images have {channels} channel(s)")
    if positive and any(v <= 0 for v in values):
        raise UserError(f"config key '{key}': every value must be > 0 (got {values})")
    return tuple(float(v) for v in values)

__all__ = ["SOURCES", "SOURCE_DESCRIPTIONS", "cifar", "files", "folders", "load_dataset", "register_source", "sources"]
