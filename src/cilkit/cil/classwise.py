"""Per-class reductions over rows labelled with class positions: counts, means, and the
normalised means of normalised features (iCaRL's class means, LUCIR's imprinted weights, SIR's
prototypes). One ``index_add_`` pass, no loop over classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_counts(pos: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes,) number of rows per class position (rows with position -1 ignored)."""
    return torch.bincount(pos[pos >= 0], minlength=n_classes)[:n_classes]


def class_means(values: torch.Tensor, positions: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, D) mean of the rows of ``values`` (N, D) per class position; NaN rows for a
    class without rows. Computed in the dtype of ``values``."""
    sums = values.new_zeros(n_classes, values.shape[1]).index_add_(0, positions, values)
    counts = class_counts(positions, n_classes).to(values.dtype)
    means = sums / counts.clamp_min(1)[:, None]
    means[counts == 0] = float("nan")
    return means


def normalised_class_means(features: torch.Tensor, positions: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, D) ``normalize(mean_i normalize(f_i))`` over the images of each class (float32;
    iCaRL's class mean, Rebuffi et al. 2017, Alg. 1); NaN rows for a class without images."""
    return F.normalize(class_means(F.normalize(features.float(), dim=1), positions, n_classes), dim=1)
