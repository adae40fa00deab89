"""Classifier heads that grow as new classes arrive, and the backbone + head model."""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.models.growing import GrowingBackbone, SharedPrefixGrowingBackbone
from cilkit.models.lsc import LocalSimilarityClassifier
from cilkit.models.split import SplitRows

AuxSource = Literal["features", "branch"]


def _linear_init(weight: torch.Tensor, bias: torch.Tensor, in_dim: int) -> None:
    """In-place ``nn.Linear`` default init: kaiming_uniform(a=sqrt(5)), bias U(+-1/sqrt(D))."""
    if weight.numel() == 0:
        return
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(in_dim) if in_dim > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound)


class IncrementalLinear(nn.Module):
    """A linear classifier whose output rows grow state by state.

    ``weight`` is one ``nn.Parameter`` of shape ``(C, D)`` and ``bias`` one of shape ``(C,)``.
    ``add_classes(n)`` re-creates both by concatenating the old values (kept bit-identical)
    with ``n`` new rows initialised like ``nn.Linear``'s default from the global torch RNG.
    ``add_inputs(n)`` widens the input instead (a backbone that grows, DER): ``n`` zero columns
    are appended to ``weight``. Because the parameters are new objects after growth, optimizers
    (and anything else holding references to the old parameters) must be rebuilt after
    ``add_classes`` or ``add_inputs``.
    """

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.weight = nn.Parameter(torch.empty(0, in_dim))
        self.bias = nn.Parameter(torch.empty(0))

    @property
    def num_classes(self) -> int:
        """Current number of output classes."""
        return self.weight.shape[0]

    def add_classes(self, n: int) -> None:
        """Append ``n`` freshly initialised output rows, keeping the old rows exactly."""
        if n < 0:
            raise ValueError(f"cannot add a negative number of classes ({n})")
        old_w, old_b = self.weight.detach(), self.bias.detach()
        new_w = torch.empty(n, self.in_dim, dtype=old_w.dtype, device=old_w.device)
        new_b = torch.empty(n, dtype=old_b.dtype, device=old_b.device)
        _linear_init(new_w, new_b, self.in_dim)
        self.weight = nn.Parameter(torch.cat([old_w, new_w], 0))
        self.bias = nn.Parameter(torch.cat([old_b, new_b], 0))

    def add_inputs(self, n: int) -> None:
        """Append ``n`` input columns to ``weight``, initialised to zero; old columns and the bias
        are kept exactly.

        Zeros (the reading chosen here for DER, whose backbone grows by ``n`` features): the
        logits of every class are unchanged right after the widening, and the new features
        enter only through weights that training learns. (PyCIL's DER code instead leaves
        these entries at the random init of the new, wider fc layer.) Rows added later by
        ``add_classes`` span all ``in_dim`` columns.
        """
        if n < 0:
            raise ValueError(f"cannot add a negative number of inputs ({n})")
        old_w = self.weight.detach()
        self.weight = nn.Parameter(torch.cat([old_w, old_w.new_zeros(old_w.shape[0], n)], 1))
        self.bias = nn.Parameter(self.bias.detach().clone())
        self.in_dim += n

    def reset_parameters(self) -> None:
        """Re-initialise all rows (e.g. IL2M's option to re-initialise the classifier)."""
        with torch.no_grad():
            _linear_init(self.weight, self.bias, self.in_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C)``; ``(N, 0)`` when no class has been added yet."""
        return F.linear(features, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_classes={self.num_classes}"


class AuxHead(nn.Module):
    """A named auxiliary classifier of an :class:`IncrementalNet` (DER's, over the newest
    backbone branch's features): a linear layer over ``source``, the model's features
    (``"features"``) or the newest branch's of a growing backbone (``"branch"``)."""

    def __init__(self, in_dim: int, out_dim: int, source: AuxSource) -> None:
        super().__init__()
        self.source = source
        self.linear = nn.Linear(in_dim, out_dim)

    def spec(self) -> dict[str, Any]:
        """What rebuilds it (with its weights from the state dict)."""
        return {"in_dim": self.linear.in_features, "out_dim": self.linear.out_features, "source": self.source}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def _aux(module: nn.Module) -> AuxHead:
    assert isinstance(module, AuxHead)
    return module


class IncrementalNet(nn.Module):
    """A backbone followed by a growable head; forward returns features and logits.

    Stage seam: ``forward(x, stages=True)`` also returns ``"stages"``, the backbone's stage
    maps (``backbone.stage_outputs``, see :mod:`cilkit.models.backbones`) from the same pass, the
    features being ``backbone.embed(stages[-1])``; it needs a backbone with both methods (all
    built-in ones) and raises ``TypeError`` naming the backbone class otherwise.

    Growth seam: with a :class:`~cilkit.models.growing.GrowingBackbone` (DER) or a
    :class:`~cilkit.models.growing.SharedPrefixGrowingBackbone` (MEMO: its shared stages
    recorded in :meth:`architecture`, frozen or not), ``grow_backbone()`` adds a backbone and
    widens the linear head with zero columns, so the logits are unchanged right after it;
    ``add_classes`` works as before.

    The model owns its shape: named auxiliary heads (:meth:`set_aux_head`, their logits in
    ``out["aux"][name]``) are modules of the model, so they move, train under DDP and are saved
    with it; :meth:`architecture` records the grown shape (classes, backbone branches and the
    frozen ones, auxiliary heads) and :meth:`rebuild` regrows a fresh model to it before a
    checkpoint's weights load.
    """

    def __init__(self, backbone: nn.Module, head: IncrementalLinear | SplitCosineLinear | LocalSimilarityClassifier
                 ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_heads = nn.ModuleDict()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(N, D)``."""
        return self.backbone(x)

    @overload
    def forward(self, x: torch.Tensor, stages: Literal[False] = False) -> dict[str, torch.Tensor]: ...

    @overload
    def forward(self, x: torch.Tensor, stages: bool) -> dict[str, Any]: ...

    def forward(self, x: torch.Tensor, stages: bool = False) -> dict[str, Any]:
        """``{"features": f, "logits": head(f)}``; with ``stages=True`` also ``"stages"``: the
        list of the backbone's stage maps, ``f`` being computed from the last of them."""
        if not stages:
            f = self.backbone(x)
            return self._with_aux({"features": f, "logits": self.head(f)})
        stage_fn, embed = getattr(self.backbone, "stage_outputs", None), getattr(self.backbone, "embed", None)
        if not callable(stage_fn) or not callable(embed):
            raise TypeError(f"backbone {type(self.backbone).__name__} does not expose its stages "
                            "(it needs methods stage_outputs(x) -> list of maps and embed(last_map) -> "
                            "features), so forward(x, stages=True) cannot return them")
        maps = list(stage_fn(x))
        f = embed(maps[-1])
        return self._with_aux({"features": f, "logits": self.head(f), "stages": maps})

    def _with_aux(self, out: dict[str, Any]) -> dict[str, Any]:
        """``out`` with ``"aux"``: each auxiliary head's logits (when the model has any)."""
        if len(self.aux_heads):
            f = out["features"]
            out["aux"] = {name: head(f if _aux(head).source == "features" else f[:, -self._branch_dim():])
                          for name, head in self.aux_heads.items()}
        return out

    def _branch_dim(self) -> int:
        if not isinstance(self.backbone, GrowingBackbone):
            raise TypeError("an auxiliary head over the newest branch needs a GrowingBackbone")
        return int(getattr(self.backbone.backbones[-1], "out_dim"))

    def set_aux_head(self, name: str, out_dim: int, source: AuxSource = "features") -> AuxHead:
        """Add (or replace) the auxiliary head ``name``: a fresh linear layer with ``out_dim``
        outputs over ``source``, on the model's device. Rebuild optimizers afterwards."""
        in_dim = self._branch_dim() if source == "branch" else int(getattr(self.backbone, "out_dim"))
        head = AuxHead(in_dim, out_dim, source)
        held = next(self.head.parameters(), None)
        self.aux_heads[name] = head.to(held.device) if held is not None else head
        return head

    def architecture(self) -> dict[str, Any]:
        """The model's grown shape, what a checkpoint records for :meth:`rebuild`."""
        arch: dict[str, Any] = {"num_classes": self.num_classes}
        if isinstance(self.backbone, GrowingBackbone):
            arch["branches"] = len(self.backbone.backbones)
            arch["frozen_branches"] = self.backbone.num_frozen
        if isinstance(self.backbone, SharedPrefixGrowingBackbone):
            arch["shared_stages"] = self.backbone.shared_stages
            arch["shared_frozen"] = self.backbone.shared_frozen
        if len(self.aux_heads):
            arch["aux_heads"] = {name: _aux(head).spec() for name, head in self.aux_heads.items()}
        return arch

    def rebuild(self, arch: dict[str, Any]) -> None:
        """Grow this (freshly built) model to ``arch`` (:meth:`architecture` of the model whose
        weights will load): its backbone branches, frozen as they were, its classes, its
        auxiliary heads."""
        branches = int(arch.get("branches", 1))
        if branches > 1:
            if not isinstance(self.backbone, GrowingBackbone):
                raise TypeError(f"the checkpoint's model has {branches} backbone branches, this one cannot grow")
            while len(self.backbone.backbones) < branches:
                self.grow_backbone(freeze_old=False)
            self.backbone.freeze_first(int(arch.get("frozen_branches", 0)))
        if "shared_stages" in arch:
            self._rebuild_shared(int(arch["shared_stages"]), bool(arch.get("shared_frozen", False)))
        grow = int(arch["num_classes"]) - self.num_classes
        if grow > 0:
            self.add_classes(grow)
        for name, spec in arch.get("aux_heads", {}).items():
            self.set_aux_head(name, int(spec["out_dim"]), spec["source"])

    def _rebuild_shared(self, shared_stages: int, frozen: bool) -> None:
        """The shared prefix of a :class:`SharedPrefixGrowingBackbone` as the checkpoint's was:
        the same stages shared (else its weights could not load), frozen if they were."""
        if not isinstance(self.backbone, SharedPrefixGrowingBackbone) or self.backbone.shared_stages != shared_stages:
            held = getattr(self.backbone, "shared_stages", None)
            raise TypeError(f"the checkpoint's model shares its first {shared_stages} backbone stages, this one "
                            f"{'shares none' if held is None else f'shares {held}'}")
        if frozen:
            self.backbone.freeze_shared()

    def add_classes(self, n: int) -> None:
        """Grow the head by ``n`` classes (rebuild optimizers afterwards)."""
        self.head.add_classes(n)

    def grow_backbone(self, freeze_old: bool = True) -> nn.Module:
        """Add a backbone to a ``GrowingBackbone`` (freezing the old ones by default) and widen
        the linear head by its ``out_dim`` with zero columns (``IncrementalLinear.add_inputs``);
        returns the new backbone. Rebuild optimizers afterwards."""
        grow = getattr(self.backbone, "grow", None)
        if not callable(grow):
            raise TypeError(f"backbone {type(self.backbone).__name__} cannot grow "
                            "(use cilkit.models.GrowingBackbone)")
        if not isinstance(self.head, IncrementalLinear):
            raise TypeError(f"grow_backbone needs an IncrementalLinear head, not {type(self.head).__name__}")
        new = grow(freeze_old=freeze_old)
        self.head.add_inputs(int(getattr(new, "out_dim")))
        return new

    @property
    def num_classes(self) -> int:
        """Number of classes the head currently outputs."""
        return self.head.num_classes


class SplitCosineLinear(SplitRows):
    """LUCIR's cosine classifier (Hou et al., CVPR 2019, Sec. 3.2, Eq. 4):
    ``logits = sigma * cos(f, w_c)``, with one learnable scalar ``sigma`` (initialised to 1).

    The class weights are split as in the original code's ``SplitCosineLinear``
    (:class:`~cilkit.models.split.SplitRows`): ``weight_old`` frozen, ``weight_new`` trained;
    both share ``sigma``. ``add_classes(n)`` starts a new state: the current new rows join the
    frozen block and ``n`` fresh rows are drawn from U(-1/sqrt(D), 1/sqrt(D)) (the original
    ``CosineLinear.reset_parameters``) from the global torch RNG.
    """

    def __init__(self, in_dim: int) -> None:
        super().__init__(in_dim)
        self.sigma = nn.Parameter(torch.ones(()))

    @property
    def num_classes(self) -> int:
        """Current number of output classes (frozen + trained rows)."""
        return self.weight_old.shape[0] + self.weight_new.shape[0]

    def add_classes(self, n: int) -> None:
        """Freeze every current row and append ``n`` fresh trainable rows."""
        fresh = self._fresh_rows(n)
        bound = 1.0 / math.sqrt(self.in_dim) if self.in_dim > 0 else 0.0
        nn.init.uniform_(fresh, -bound, bound)
        self._append(fresh)

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """Unscaled cosine similarities ``(N, C)`` between features and class weights."""
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``sigma * cos(f, w)``, ``(N, C)``."""
        return self.sigma * self.cosine(features)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_classes={self.num_classes}, frozen={self.num_frozen}"
