"""MEMO, Memory-efficient Expandable MOdel (Zhou, Wang, Ye & Zhan, "A Model or 603 Exemplars:
Towards Memory-Efficient Class-Incremental Learning", ICLR 2023).

Written from the paper's description and checked against the authors' code: wangkiw/ICLR23-MEMO
(``models/memo.py``, ``utils/inc_net.py`` ``AdaptiveNet``, ``convs/memo_cifar_resnet.py``,
``main_memo.py``) and its copy in PyCIL (G-U-N/PyCIL, the same files, ``exps/memo.json``). The
paper's equation numbers are not cited here: its text was not at hand when this was written.

The model (:class:`cilkit.models.growing.SharedPrefixGrowingBackbone`): the backbone is split
into generalised shallow stages, shared by every state (the authors' ``TaskAgnosticExtractor``),
and a specialised deep block, one per state (``AdaptiveExtractors``). For ResNet-32 the authors'
``memo_resnet32`` shares the stem and the first two stages and replicates the third; for
ResNet-18 (``memo_resnet18``) it shares the stem and three stages and replicates the fourth:
``shared_stages: null`` (default) shares every stage but the last, as both do; the ``convnet``
(two stages) then shares its first. The features of all blocks are concatenated, oldest first,
and the linear classifier reads them all.

Per state b >= 1, before training:

- a new specialised block is appended, initialised from the previous one's weights (the
  authors' ``update_fc``: ``AdaptiveExtractors[-1].load_state_dict(AdaptiveExtractors[-2]...)``);
  the old blocks are frozen (``requires_grad`` False and BN in eval: the authors' default
  ``train_adaptive`` false);
- the classifier is widened by the new block's features and grows the new classes' rows. The
  authors build a fresh wider layer and copy the old weights into it, so the old classes'
  weights on the new features keep the layer's random init; here they start at zero
  (``IncrementalLinear.add_inputs``, the reading DER's seam chose): the logits of the old
  classes are unchanged when the block is added, and training learns those weights;
- an auxiliary classifier over the new block's features alone, with the state's new classes
  plus one class that stands for all the old ones (target ``y - n_old + 1`` for a new class, 0 for an old
  one), trained with the loss ``CE(logits, y) + alpha_aux * CE(aux_logits, aux_target)``
  (``alpha_aux`` 1 in the authors' options). State 0 trains plain cross-entropy (the authors'
  ``_init_train``).
- the generalised stages: the authors' code keeps training them when ``train_base`` is set
  (``--train_base`` in their README's command and ``"train_base": true`` in PyCIL's
  ``exps/memo.json``) and freezes them after state 0 otherwise (the argparse default), which is
  the method's description in the paper and the issue's: ``train_shared: false`` (default)
  freezes them (``requires_grad`` False, BN in eval) from state 1 on; ``train_shared: true``
  is the authors' released command. ``configs/memo-cifar100-b0-10.yaml`` follows the command.

After each incremental state's training: Weight Aligning of the new classes' rows (the authors'
``weight_align``, as WA: ``gamma = mean ||W_old,i|| / mean ||W_new,j||``, ``W_new <- gamma
W_new``), ``align: true`` (default). As in ``wa``, it runs in ``after_state``, after the memory
update: herding reads the features, never the classifier, so the exemplars are the authors'.

Schedules: the authors train state 0 for 200 epochs (lr 0.1, x0.1 at 60/120/170, weight decay
5e-4) and the later states for 170 (x0.1 at 80/120/150, weight decay 2e-4). ``train`` gives
state 0's (``epochs_first`` / ``epochs``); ``incremental_milestones`` and
``incremental_weight_decay`` replace the schedule's milestones and the weight decay from state 1
on (null: the ``train`` section's).

State 0: one block on the shared stages computes the plain backbone, so state 0 trains as
fine-tuning does, number for number (``tests/test_memo.py``); its parameters are named by shared
stages and blocks, so its state-0 cache entries are MEMO's own (no ``state0_like``).

Backbones: a ResNet (``resnet32``, ``resnet18``, ``resnet18_cifar``) or the ``convnet``; any other
is refused in one line. The authors' ResNet-32 uses parameter-free ("option A") shortcuts, and
cilkit's ``resnet32`` 1x1-conv ones (option B).

Per state >= 1, ``results.json`` records under ``memo``: ``blocks`` (specialised blocks held),
``trainable_parameters``, ``gamma`` of the alignment (null when not aligned) and the mean norms
``norm_old`` / ``norm_new`` before it. Scores: the logits.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cilkit.common.errors import UserError
from cilkit.methods.base import Batch, Context, FitSpec, LossTerms, Method, MethodConfig, head_of
from cilkit.methods.wa import align_new_rows
from cilkit.models import IncrementalLinear, IncrementalNet, build_backbone
from cilkit.models.growing import SharedPrefixGrowingBackbone, stage_split
from cilkit.settings.options import option
from cilkit.settings.registry import register_method

AUX = "memo"  # the auxiliary head's name: its logits are out["aux"]["memo"]


class MEMOConfig(MethodConfig):
    shared_stages: int | None = option(
        None, ge=0,
        help="backbone stages shared by all states (after the stem); null: every stage but the last, as the authors' "
             "memo_resnet32 (2 of 3) and memo_resnet18 (3 of 4)")
    alpha_aux: float = option(1.0, ge=0, state0=False,
                              help="weight of the auxiliary classifier's cross-entropy (the authors' alpha_aux: 1)")
    train_shared: bool = option(
        False, state0=False,
        help="keep training the shared stages after state 0 (the authors' --train_base, their README's command); "
             "false: frozen from state 1 on, BN in eval (the paper's description)")
    align: bool = option(True, state0=False,
                         help="Weight Aligning of the new classes' rows after each incremental state (the authors')")
    incremental_milestones: list[int] | None = option(
        None, state0=False,
        help="the schedule's milestones from state 1 on (the authors': [80, 120, 150]); null: train.schedule's")
    incremental_weight_decay: float | None = option(
        None, ge=0, state0=False, help="the weight decay from state 1 on (the authors': 2e-4); null: train's")
    quick: ClassVar[dict[str, Any]] = {}


def aux_targets(labels: torch.Tensor, n_old: int) -> torch.Tensor:
    """The auxiliary classifier's targets: 0 for an old class, ``y - n_old + 1`` for a new one."""
    return torch.where(labels >= n_old, labels - n_old + 1, torch.zeros_like(labels))


def memo_loss(logits: torch.Tensor, aux_logits: torch.Tensor | None, labels: torch.Tensor, n_old: int,
              alpha_aux: float) -> LossTerms:
    """One batch's loss: ``CE(logits, y)``, plus ``alpha_aux * CE(aux_logits, aux_target)`` when
    there is an auxiliary head (states >= 1)."""
    terms = {"ce": F.cross_entropy(logits, labels)}
    if aux_logits is not None:
        terms["aux"] = alpha_aux * F.cross_entropy(aux_logits, aux_targets(labels, n_old))
    return terms


@register_method("memo")
class MEMO(Method):
    description = ("MEMO: shared generalised shallow stages, a specialised deep block per state (copied from the "
                   "previous one, the old ones frozen), the classifier over all blocks' features, an auxiliary "
                   "classifier over the new block's, then Weight Aligning")
    Config = MEMOConfig
    cfg: MEMOConfig

    def build_model(self, in_channels: int, image_size: int) -> IncrementalNet:
        m = self.run_config.model

        def backbone() -> torch.nn.Module:
            return build_backbone(m.backbone, in_channels=in_channels, image_size=image_size, width=m.width)

        first = backbone()  # built once: the shared stages and the first block are its own modules
        grown = SharedPrefixGrowingBackbone(lambda: first, self._shared_stages(first, m.backbone))
        return IncrementalNet(grown, IncrementalLinear(grown.out_dim))

    def _shared_stages(self, net: torch.nn.Module, name: str) -> int:
        """``shared_stages`` resolved for the backbone, or a one-line refusal."""
        split = stage_split(net)
        if split is None:
            raise UserError(f"config key 'model.backbone': memo splits a ResNet (resnet32, resnet18, resnet18_cifar) or "
                            f"the convnet into shared and specialised stages; '{name}' is neither: choose one of them")
        n_stages = len(split[1])
        shared = n_stages - 1 if self.cfg.shared_stages is None else self.cfg.shared_stages
        if shared >= n_stages:
            raise UserError(f"config key 'memo.shared_stages': backbone '{name}' has {n_stages} stages and at least "
                            f"the last is specialised: set it to at most {n_stages - 1} (or null)")
        return shared

    def _backbone(self, ctx: Context) -> SharedPrefixGrowingBackbone:
        backbone = ctx.model.backbone
        if not isinstance(backbone, SharedPrefixGrowingBackbone):
            raise TypeError("memo needs the SharedPrefixGrowingBackbone built by its build_model")
        return backbone

    # ----- hooks -------------------------------------------------------------------------------
    def before_state(self, ctx: Context) -> None:
        if ctx.state.index >= 1:
            backbone = self._backbone(ctx)
            if not self.cfg.train_shared:
                backbone.freeze_shared()
            ctx.model.grow_backbone()  # a copy of the newest block; the old ones frozen; the head widened
        super().before_state(ctx)
        if ctx.state.index >= 1:
            ctx.model.set_aux_head(AUX, ctx.state.n_new + 1, source="branch")
            ctx.record.results["blocks"] = len(self._backbone(ctx).backbones)
            ctx.record.results["trainable_parameters"] = sum(
                p.numel() for p in ctx.model.parameters() if p.requires_grad)

    def fit_spec(self, ctx: Context, spec: FitSpec) -> FitSpec:
        """From state 1 on, the authors' incremental schedule where the options give it."""
        if ctx.state.index == 0:
            return spec
        if self.cfg.incremental_milestones is not None:
            spec = spec.replace(schedule=spec.schedule.model_copy(update={"milestones": self.cfg.incremental_milestones}))
        if self.cfg.incremental_weight_decay is not None:
            spec = spec.replace(weight_decay=self.cfg.incremental_weight_decay)
        return spec

    def loss(self, ctx: Context, batch: Batch, out: dict[str, Any]) -> LossTerms:
        aux = out["aux"][AUX] if "aux" in out else None
        return memo_loss(out["logits"], aux, batch.y, ctx.state.n_old, self.cfg.alpha_aux)

    def after_state(self, ctx: Context) -> None:
        if ctx.state.index == 0:
            return
        head = head_of(ctx, IncrementalLinear, "memo")
        ctx.record.results.update(align_new_rows(head, ctx.state.n_old, self.cfg.align))
