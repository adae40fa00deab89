"""The annotation oracle of active class-incremental learning: the only holder of the pool's
labels. A label leaves it only when its image is annotated, and every annotation is counted,
so the active code provably trains and selects with the labels it paid for and no other."""

from __future__ import annotations

import torch

from cilkit.cil.classwise import class_counts


class Oracle:
    """A pool of training-set indices whose labels (class positions) stay hidden until
    :meth:`annotate` is called on them. An image is annotated at most once."""

    def __init__(self, pool: torch.Tensor, positions: torch.Tensor) -> None:
        """``pool``: the training-set indices of the unlabelled images; ``positions``: the class
        position of every training image (the hidden ground truth, read only by ``annotate``)."""
        self.pool = pool.clone()
        self._positions = positions
        self._in_pool = torch.zeros(positions.numel(), dtype=torch.bool)
        self._in_pool[self.pool] = True
        self._done = torch.zeros(positions.numel(), dtype=torch.bool)
        self._annotated: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.revealed = 0  # labels handed out so far

    def annotate(self, indices: torch.Tensor | int) -> torch.Tensor:
        """Reveal the class positions of ``indices`` (pool images not yet annotated)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and not bool(self._in_pool[idx].all()):
            raise ValueError("oracle: an index outside the pool was sent for annotation")
        if bool(self._done[idx].any()) or idx.unique().numel() != idx.numel():
            raise ValueError("oracle: an image was sent for annotation twice")
        labels = self._positions[idx].clone()
        self._done[idx] = True
        self._annotated.append(idx.clone())
        self._labels.append(labels)
        self.revealed += int(idx.numel())
        return labels

    @property
    def annotated(self) -> torch.Tensor:
        """Training-set indices annotated so far, in annotation order."""
        return torch.cat(self._annotated) if self._annotated else torch.empty(0, dtype=torch.int64)

    @property
    def labels(self) -> torch.Tensor:
        """The revealed class positions, aligned with :attr:`annotated`."""
        return torch.cat(self._labels) if self._labels else torch.empty(0, dtype=torch.int64)

    @property
    def unlabelled(self) -> torch.Tensor:
        """Pool indices not annotated yet (pool order)."""
        return self.pool[~self._done[self.pool]]

    def is_annotated(self, indices: torch.Tensor) -> torch.Tensor:
        """Boolean per index: has it been annotated?"""
        return self._done[indices]

    def counts(self, n_classes: int) -> torch.Tensor:
        """(n_classes,) annotations per class position."""
        return class_counts(self.labels, n_classes)
