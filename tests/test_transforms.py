"""Batched augmentation: an epoch's crops and flips drawn before its first batch, from the
run's CPU generator, are the numbers the per-batch reading gives (row offsets, column offsets,
flips, batch after batch), applied as the CIFAR convention says (zero padding, crop, mirror)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cilkit.data.base import TensorImages
from cilkit.data.transforms import Augment, draw_epoch

MEAN, STD = torch.tensor([0.0]), torch.tensor([1.0 / 255.0])  # normalise() then gives the raw pixels


def _images(n: int = 13, size: int = 5) -> TensorImages:
    pixels = torch.randint(1, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    return TensorImages(pixels, torch.arange(n) % 4)


def _by_hand(images: np.ndarray, sizes: list[int], pad: int, flip: bool, seed: int) -> list[np.ndarray]:
    """The per-batch reading, image by image: for each batch of n, n row offsets, n column
    offsets (uniform in 0..2*pad), n uniforms (< 0.5 mirrors), then pad with zeros and crop."""
    g = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for n in sizes:
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
        mirror = (torch.rand(n, generator=g) < 0.5).tolist() if flip else [False] * n
        batch = []
        for i in range(n):
            img = images[start + i, 0]
            h, w = img.shape
            padded = np.zeros((h + 2 * pad, w + 2 * pad), dtype=img.dtype)
            padded[pad : pad + h, pad : pad + w] = img
            crop = padded[oy[i] : oy[i] + h, ox[i] : ox[i] + w]
            batch.append(crop[:, ::-1] if mirror[i] else crop)
        out.append(np.stack(batch)[:, None])
        start += n
    return out


@pytest.mark.parametrize("flip", [True, False])
def test_an_epochs_crops_and_flips_are_the_per_batch_draws_of_the_seed(flip):
    images = _images()
    got = [x.round().to(torch.uint8).numpy() for x, _, _ in images.batches(
        torch.arange(13), 5, mean=MEAN, std=STD, augment=Augment(crop_pad=2, flip=flip),
        generator=torch.Generator().manual_seed(11))]
    want = _by_hand(images.images.numpy(), [5, 5, 3], pad=2, flip=flip, seed=11)
    assert len(got) == 3
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_the_epochs_numbers_are_drawn_before_its_first_batch():
    """Drawn at once: after the first batch the generator has moved past the whole epoch, and
    the later batches draw nothing."""
    g = torch.Generator().manual_seed(0)
    batches = _images().batches(torch.arange(13), 4, mean=MEAN, std=STD, augment=Augment(crop_pad=1, flip=True),
                                shuffle=True, generator=g)
    next(batches)
    after_first = g.get_state().clone()
    rest = list(batches)
    assert len(rest) == 3 and torch.equal(g.get_state(), after_first)
    # what was drawn: the shuffle, then 3 numbers for each of the 13 images
    ref = torch.Generator().manual_seed(0)
    torch.randperm(13, generator=ref)
    draw_epoch(Augment(crop_pad=1, flip=True), [4, 4, 4, 1], ref, "cpu")
    assert torch.equal(ref.get_state(), after_first)


def test_the_same_seed_gives_the_same_epoch_and_another_seed_another():
    def epoch(seed: int) -> torch.Tensor:
        return torch.cat([x for x, _, _ in _images().batches(
            torch.arange(13), 4, mean=MEAN, std=STD, augment=Augment(crop_pad=2, flip=True),
            generator=torch.Generator().manual_seed(seed))])

    assert torch.equal(epoch(4), epoch(4))
    assert not torch.equal(epoch(4), epoch(5))


def test_an_identity_augmentation_draws_nothing_and_changes_nothing():
    images, g = _images(), torch.Generator().manual_seed(2)
    state = g.get_state().clone()
    x = torch.cat([x for x, _, _ in images.batches(torch.arange(13), 4, mean=MEAN, std=STD, augment=Augment(),
                                                  generator=g)])
    assert torch.equal(g.get_state(), state)
    assert torch.equal(x.round().to(torch.uint8), images.images)


def test_a_batchs_rows_are_its_slice_of_the_epochs_numbers():
    draws = draw_epoch(Augment(crop_pad=3, flip=True), [4, 2], torch.Generator().manual_seed(9), "cpu")
    g = torch.Generator().manual_seed(9)
    first = [torch.randint(0, 7, (4,), generator=g), torch.randint(0, 7, (4,), generator=g),
             torch.rand(4, generator=g) < 0.5]
    rows = draws.batch(0, (1, 3, 4))
    assert rows.offsets is not None and rows.flips is not None
    assert torch.equal(rows.offsets[0], first[0][1:3]) and torch.equal(rows.offsets[1], first[1][1:3])
    assert torch.equal(rows.flips, first[2][1:3])
    assert draws.batch(1).offsets.shape == (2, 2)  # type: ignore[union-attr]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_same_seed_gives_the_same_crops_and_flips_on_the_gpu():
    def epoch(device: str) -> torch.Tensor:
        return torch.cat([x.cpu() for x, _, _ in _images().batches(
            torch.arange(13), 4, mean=MEAN, std=STD, augment=Augment(crop_pad=2, flip=True), shuffle=True,
            generator=torch.Generator().manual_seed(6), device=device)])

    assert torch.equal(epoch("cpu"), epoch("cuda"))
