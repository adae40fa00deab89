"""MEMO (Zhou et al., ICLR 2023): issue 39 items 3 and 4.

- the block composition against an independent transcription of the authors' ``AdaptiveNet``
  forward (shared map once, every specialised block on it, features concatenated oldest first,
  the classifier over all of them, the auxiliary classifier over the newest block's), values and
  gradients, and the comparison failing on a deliberate mutation (the blocks in reverse order);
- the loss against a transcription of the authors' ``_update_representation`` (auxiliary
  targets ``where(y - known + 1 > 0, y - known + 1, 0)``, ``CE + alpha_aux * CE_aux``), values
  and gradients, failing on a mutation (old classes mapped to the last auxiliary class);
- a real state 1: the new block starts as a copy of the previous one, the old block and the
  shared stages are frozen (no gradient, BN in eval while the model trains), the auxiliary head
  has n_new + 1 outputs over the new block; ``train_shared: true`` keeps the shared stages
  training;
- the grown model rebuilt from its architecture alone (a fresh model, ``rebuild``, the weights)
  gives the same outputs and the same frozen parts;
- refusals in one line: a backbone without known stages (lenet), ``shared_stages`` too large.
(Resume after states 1 and 2, DDP and the hook checks: the registry-wide tests run ``memo``.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cilkit.common.errors import UserError
from cilkit.methods import memo as memo_module
from cilkit.models import IncrementalLinear, IncrementalNet, build_backbone
from cilkit.models.growing import SharedPrefixGrowingBackbone
from cilkit.settings.registry import METHODS

from helpers import state_context, tiny_config


def _grown_model(blocks: int = 3, seed: int = 0) -> IncrementalNet:
    """A convnet (8x8, width 8) MEMO model with ``blocks`` blocks, 3 classes per block, an
    auxiliary head over the newest block, every parameter and BN statistic perturbed."""
    torch.manual_seed(seed)
    backbone = SharedPrefixGrowingBackbone(lambda: build_backbone("convnet", in_channels=1, image_size=8, width=8), 1)
    model = IncrementalNet(backbone, IncrementalLinear(backbone.out_dim))
    model.add_classes(3)
    for _ in range(blocks - 1):
        model.grow_backbone()
        model.add_classes(3)
    model.set_aux_head("memo", 4, source="branch")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.1)
    return model.eval()


def _authors_forward(model: IncrementalNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The authors' ``AdaptiveNet.forward`` transcribed, on a plain convnet per block: the
    block's network is the shared layers followed by the block's layers (one full convnet with
    those weights), ``features = cat(extractor(x) ...)``, ``logits = fc(features)``,
    ``aux_logits = aux_fc(features[:, -out_dim:])``."""
    state = model.state_dict()
    shared = {k[len("backbone.shared."):]: v for k, v in state.items() if k.startswith("backbone.shared.")}
    feats = []
    for j in range(len(model.backbone.backbones)):
        net = build_backbone("convnet", in_channels=1, image_size=8, width=8)
        pool = net._pool_index
        full = {}
        for key, value in net.state_dict().items():  # body.<i>...: shared below the pool, block j from it
            i = int(key.split(".")[1])
            rest = key.split(".", 2)[2]
            # the shared stage keeps the body's layer numbers, and so does the block's stage
            full[key] = shared[f"1.{i}.{rest}"] if i < pool else state[f"backbone.backbones.{j}.stages.0.{i}.{rest}"]
        net.load_state_dict(full)
        net.eval()
        feats.append(net(x))
    features = torch.cat(feats, 1)
    out_dim = feats[-1].shape[1]
    logits = F.linear(features, state["head.weight"], state["head.bias"])
    aux = F.linear(features[:, -out_dim:], state["aux_heads.memo.linear.weight"], state["aux_heads.memo.linear.bias"])
    return {"features": features, "logits": logits, "aux": aux}


def test_block_composition_matches_the_authors_adaptive_net(monkeypatch):
    model = _grown_model()
    x = torch.randn(5, 1, 8, 8, requires_grad=True)
    ours = model(x)
    ref = _authors_forward(model, x)
    assert torch.allclose(ours["features"], ref["features"], atol=1e-6)
    assert torch.allclose(ours["logits"], ref["logits"], atol=1e-6)
    assert torch.allclose(ours["aux"]["memo"], ref["aux"], atol=1e-6)
    # gradients through both, to the input
    g_ours = torch.autograd.grad((ours["logits"].sum() + ours["aux"]["memo"].square().sum()), x)[0]
    g_ref = torch.autograd.grad((ref["logits"].sum() + ref["aux"].square().sum()), x)[0]
    assert torch.allclose(g_ours, g_ref, atol=1e-5)
    # a deliberate mutation (the blocks concatenated newest first) is caught
    monkeypatch.setattr(SharedPrefixGrowingBackbone, "forward",
                        lambda self, x: torch.cat([b(self.shared(x)) for b in reversed(self.backbones)], 1))
    assert not torch.allclose(model(x)["logits"], ref["logits"], atol=1e-3)


def _authors_loss(logits, aux_logits, targets, known, alpha_aux):
    """PyCIL / ICLR23-MEMO ``_update_representation``, transcribed."""
    loss_clf = F.cross_entropy(logits, targets)
    aux_targets = targets.clone()
    aux_targets = torch.where(aux_targets - known + 1 > 0, aux_targets - known + 1, 0)
    loss_aux = F.cross_entropy(aux_logits, aux_targets)
    return loss_clf + alpha_aux * loss_aux


def _loss_case(mutate=None):
    g = torch.Generator().manual_seed(1)
    known, n_new = 6, 3
    logits = torch.randn(16, known + n_new, generator=g, requires_grad=True)
    aux = torch.randn(16, n_new + 1, generator=g, requires_grad=True)
    y = torch.randint(0, known + n_new, (16,), generator=g)
    y[:2] = torch.tensor([0, known])  # an old and a new class at least
    terms = memo_module.memo_loss(logits, aux, y, known, 0.7)
    ours = sum(terms.values())
    ref_logits, ref_aux = logits.detach().clone().requires_grad_(True), aux.detach().clone().requires_grad_(True)
    ref = _authors_loss(ref_logits, ref_aux, y, known, 0.7)
    ours.backward()
    ref.backward()
    return ours, ref, (logits.grad, ref_logits.grad), (aux.grad, ref_aux.grad), set(terms)


def test_loss_matches_the_authors_with_gradients(monkeypatch):
    ours, ref, g_logits, g_aux, names = _loss_case()
    assert names == {"ce", "aux"}
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(*g_logits, atol=1e-7) and torch.allclose(*g_aux, atol=1e-7)
    # state 0 (no auxiliary head) is plain cross-entropy
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert torch.equal(memo_module.memo_loss(logits, None, y, 0, 1.0)["ce"], F.cross_entropy(logits, y))
    # a deliberate mutation: the old classes mapped to the last auxiliary class instead of 0
    monkeypatch.setattr(memo_module, "aux_targets",
                        lambda labels, n_old: torch.where(labels >= n_old, labels - n_old, torch.full_like(labels, 3)))
    ours, ref, *_ = _loss_case()
    assert not torch.allclose(ours, ref, atol=1e-4)


def _cfg(tmp_path, *extra: str):
    return tiny_config(tmp_path, "method=memo", "threads=1", "state0_cache=null", "train.epochs=1", *extra)


def test_state_one_grows_a_copied_block_and_freezes_the_rest(tmp_path):
    run, ctx = state_context(_cfg(tmp_path), tmp_path / "r", 1)
    backbone = run.model.backbone
    assert isinstance(backbone, SharedPrefixGrowingBackbone) and len(backbone.backbones) == 2
    old, new = backbone.backbones
    for (k, a), (k2, b) in zip(old.state_dict().items(), new.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k  # the new block starts from the previous one's weights
    assert all(p.requires_grad for p in new.parameters())
    assert not any(p.requires_grad for p in old.parameters())
    assert not any(p.requires_grad for p in backbone.shared.parameters())
    run.model.train()
    assert not old.training and not backbone.shared.training and new.training
    aux = run.model.aux_heads["memo"]
    assert aux.linear.out_features == ctx.state.n_new + 1 and aux.linear.in_features == new.out_dim
    # the optimiser sees only what trains: the new block, the head, the auxiliary head
    trainable = {id(p) for group in run.method.param_groups(ctx) for p in group["params"]}
    assert trainable == {id(p) for m in (new, run.model.head, aux) for p in m.parameters()}


def test_train_shared_keeps_the_shared_stages_training(tmp_path):
    run, _ = state_context(_cfg(tmp_path, "memo.train_shared=true"), tmp_path / "r", 1)
    backbone = run.model.backbone
    assert all(p.requires_grad for p in backbone.shared.parameters())
    run.model.train()
    assert backbone.shared.training and not backbone.backbones[0].training


def test_the_grown_model_is_rebuilt_from_its_architecture_alone(tmp_path):
    model = _grown_model()
    model.backbone.freeze_shared()
    arch = model.architecture()
    assert arch["branches"] == 3 and arch["frozen_branches"] == 2
    assert arch["shared_stages"] == 1 and arch["shared_frozen"] is True
    method = METHODS["memo"](_cfg(tmp_path, "model.width=8"))
    fresh = method.build_model(1, 8)
    fresh.rebuild(arch)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(fresh(x)["logits"], model(x)["logits"])
    assert not any(p.requires_grad for p in fresh.backbone.shared.parameters())
    assert fresh.backbone.num_frozen == 2 and fresh.backbone.shared_frozen
    # a model that shares other stages refuses the checkpoint's shape
    other = METHODS["memo"](_cfg(tmp_path, "memo.shared_stages=0")).build_model(1, 8)
    with pytest.raises(TypeError, match="shares its first 1 backbone stages, this one shares 0"):
        other.rebuild(arch)


def test_backbones_without_known_stages_and_too_many_shared_stages_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"config key 'model.backbone': memo splits .*'lenet' is neither"):
        METHODS["memo"](_cfg(tmp_path, "model.backbone=lenet")).build_model(1, 8)
    with pytest.raises(UserError, match=r"config key 'memo.shared_stages': backbone 'convnet' has 2 stages.*at most 1"):
        METHODS["memo"](_cfg(tmp_path, "memo.shared_stages=2")).build_model(1, 8)
    # the default shares every stage but the last: 2 of resnet32's 3 (the authors' memo_resnet32)
    resnet = METHODS["memo"](_cfg(tmp_path, "model.backbone=resnet32")).build_model(3, 32)
    assert isinstance(resnet.backbone, SharedPrefixGrowingBackbone) and resnet.backbone.shared_stages == 2
    assert [m.conv1.out_channels for m in resnet.backbone.backbones[0].stages[0]] == [64] * 5


def test_one_block_is_the_factorys_backbone_and_state_0_trains_as_fine_tuning(tmp_path):
    """The seam with one block computes the plain backbone (resnet32, the default split 2 + 1),
    so MEMO's state 0 is fine-tuning's, number for number (the docs' claim)."""
    torch.manual_seed(5)
    plain = build_backbone("resnet32", in_channels=3, image_size=32).eval()
    torch.manual_seed(5)
    memo_backbone = SharedPrefixGrowingBackbone(lambda: build_backbone("resnet32", in_channels=3, image_size=32), 2)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(memo_backbone.eval()(x), plain(x))

    from cilkit.run.loop import Run

    models = {}
    for name in ("finetune", "memo"):
        cfg = tiny_config(tmp_path, f"method={name}", "threads=1", "state0_cache=null", "train.epochs=1")
        run = Run(cfg, tmp_path / name, progress=False)
        run.execute(until_state=0)
        models[name] = run.model.eval()
    images = torch.randn(6, 1, 8, 8)
    assert torch.equal(models["memo"](images)["logits"], models["finetune"](images)["logits"])
