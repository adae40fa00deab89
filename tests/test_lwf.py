"""LwF (class-incremental) against transcriptions of its two losses (iCaRL's LwF-MC and FACIL's
multi-class reading of Li & Hoiem's Eq. 2), written with explicit loops in float64 and checked
with their gradients; and a run without memory that distils."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import assert_value_and_gradient, tiny_config, total

from cilkit.methods.lwf import LwFConfig, lwf_loss
from cilkit.run.loop import Run


def lwf_mc_by_hand(z: torch.Tensor, y: torch.Tensor, old: torch.Tensor | None, divisor: int) -> torch.Tensor:
    """iCaRL Alg. 3 without exemplars: sum over classes of the binary cross-entropy of
    sigmoid(z_c) against t_c = sigmoid(old_c) for an old class, [y == c] for a new one."""
    total = z.new_zeros(())
    n_old = 0 if old is None else old.shape[1]
    for i in range(z.shape[0]):
        for c in range(z.shape[1]):
            t = 1 / (1 + torch.exp(-old[i, c])) if c < n_old else (1.0 if int(y[i]) == c else 0.0)
            g = 1 / (1 + torch.exp(-z[i, c]))
            total = total - (t * torch.log(g) + (1 - t) * torch.log(1 - g))
    return total / (z.shape[0] * divisor)


def ce_kd_by_hand(z: torch.Tensor, y: torch.Tensor, old: torch.Tensor, T: float, lam: float) -> torch.Tensor:
    """Cross-entropy over all classes + lam * sum_j -p_j(old / T) log p_j(z_old / T), batch mean."""
    total = z.new_zeros(())
    for i in range(z.shape[0]):
        norm = sum(torch.exp(z[i, j]) for j in range(z.shape[1]))
        total = total - torch.log(torch.exp(z[i, int(y[i])]) / norm)
        t_norm = sum(math.exp(float(old[i, j]) / T) for j in range(old.shape[1]))
        s_norm = sum(torch.exp(z[i, j] / T) for j in range(old.shape[1]))
        for j in range(old.shape[1]):
            p_teacher = math.exp(float(old[i, j]) / T) / t_norm
            total = total - lam * p_teacher * torch.log(torch.exp(z[i, j] / T) / s_norm)
    return total / z.shape[0]


def _batch(seed: int = 0, n: int = 5, classes: int = 6, n_old: int = 4):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, classes, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.randint(n_old, classes, (n,), generator=g)  # new-class labels: LwF has no exemplars
    old = torch.randn(n, n_old, generator=g, dtype=torch.float64) * 3
    return z, y, old


@pytest.mark.parametrize("reduction,divisor", [("sum", 1), ("mean", 10)])
def test_lwf_mc_loss_and_gradient_match_the_transcription(reduction, divisor):
    z, y, old = _batch()
    ours = total(lwf_loss(z, y, old, LwFConfig(loss="bce", bce_reduction=reduction), divisor))
    assert_value_and_gradient(ours, z, lambda ref_z: lwf_mc_by_hand(ref_z, y, old, divisor))


def test_lwf_mc_without_teacher_is_binary_cross_entropy_on_one_hot_targets():
    z, y, _ = _batch(1)
    assert torch.allclose(total(lwf_loss(z, y, None, LwFConfig())), lwf_mc_by_hand(z, y, None, 1), atol=1e-10)


@pytest.mark.parametrize("T,lam", [(2.0, 1.0), (3.0, 0.5)])
def test_ce_kd_loss_and_gradient_match_the_transcription(T, lam):
    z, y, old = _batch(2)
    ours = total(lwf_loss(z, y, old, LwFConfig(loss="ce_kd", temperature=T, lambda_kd=lam)))
    assert_value_and_gradient(ours, z, lambda ref_z: ce_kd_by_hand(ref_z, y, old, T, lam))


def test_a_run_without_memory_distils_and_keeps_more_of_the_old_classes(tmp_path):
    """Without memory, LwF and fine-tuning differ only in the distillation: LwF's old classes
    keep accuracy that fine-tuning's (which trains on new images only) loses, and nothing is
    stored in the memory."""
    common = ["memory.total=0", "threads=1", "state0_cache=null"]
    lwf = Run(tiny_config(tmp_path, "method=lwf", *common), tmp_path / "lwf", progress=False).execute()
    ft = Run(tiny_config(tmp_path, "method=finetune", *common), tmp_path / "ft", progress=False).execute()
    assert lwf["complete"] and ft["complete"]
    for b in (1, 2):
        memory = json.loads((tmp_path / "lwf" / "memory" / f"state_{b:02d}.json").read_text())
        assert memory["exemplars"] and all(ids == [] for ids in memory["exemplars"].values())
    last_lwf, last_ft = lwf["states"][-1], ft["states"][-1]
    assert last_ft["top1_old"] < 5.0  # fine-tuning on new images only forgets the old classes
    assert last_lwf["top1_old"] > last_ft["top1_old"] + 10.0
