"""A plugin dataset: images and labels from one numpy .npz file, with a key of its own
(``data.options.file``, checked with the config).

    cilkit run --plugin examples/my_dataset.py --set data.name=npz --set data.options.file=my_data.npz

The file holds uint8 arrays ``x_train`` and ``x_test`` of shape (N, H, W) or (N, C, H, W)
and int labels ``y_train`` and ``y_test`` in 0..K-1 (``numpy.savez``).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cilkit.settings.config import DataConfig
from cilkit.data.base import Dataset, TensorImages
from cilkit.common.errors import UserError
from cilkit.settings.registry import register_source


class NpzOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = Field(description="the .npz file (a relative path is read from the working directory)")


def _split(arrays: dict[str, np.ndarray], split: str) -> TensorImages:
    x = arrays[f"x_{split}"]
    x = x[:, None] if x.ndim == 3 else x  # (N, H, W) -> (N, 1, H, W)
    return TensorImages(torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(arrays[f"y_{split}"].astype(np.int64)))


@register_source("npz", "x_train, y_train, x_test, y_test of one .npz file (plugin example)", options=NpzOptions)
def read_npz(cfg: DataConfig) -> Dataset:
    file = cfg.source_options(NpzOptions).file
    try:
        with np.load(file) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"config key 'data.options.file': cannot read '{file}' ({e})") from None
    classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    return Dataset(name="npz", train=_split(arrays, "train"), test=_split(arrays, "test"),
                   class_names=[str(c) for c in range(classes)])
