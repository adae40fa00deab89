"""Per-class reductions shared by NME, LUCIR imprinting, SIR prototypes and IL2M statistics."""

import torch

from cilkit.cil.classwise import class_counts, class_means, normalised_class_means


def test_counts_ignore_dropped_images_and_cover_every_class():
    assert class_counts(torch.tensor([2, -1, 0, 2, -1]), 4).tolist() == [1, 0, 2, 0]


def test_means_by_hand_and_nan_for_a_class_without_rows():
    values = torch.tensor([[1.0, 2.0], [3.0, 6.0], [10.0, 0.0]])
    means = class_means(values, torch.tensor([0, 0, 2]), 3)
    assert means[0].tolist() == [2.0, 4.0] and means[2].tolist() == [10.0, 0.0]
    assert means[1].isnan().all()


def test_normalised_means_weigh_each_image_equally_whatever_its_norm():
    f = torch.tensor([[100.0, 0.0], [0.0, 1.0]])  # one long, one short feature of class 0
    mean = normalised_class_means(f, torch.tensor([0, 0]), 1)[0]
    assert torch.allclose(mean, torch.tensor([2**-0.5, 2**-0.5]))
