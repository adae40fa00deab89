"""The sections of the run config that describe a long tail: the per-class profile of the
training set (``scenario.imbalance``) and the many/medium/few-shot groups it is reported by. Kept
apart from :mod:`cilkit.settings.config`, which re-exports them, with the base of every section
(:class:`Strict`)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from cilkit.settings.options import StrictNumbers

__all__ = ["ImbalanceConfig", "ShotGroups", "Strict"]


class Strict(StrictNumbers):
    """A section of the run config: no unknown key, numbers that are numbers (StrictNumbers)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ShotGroups(Strict):
    """The long-tail literature's groups by training images per class (Liu et al., "Large-Scale
    Long-Tailed Recognition in an Open World", CVPR 2019): many-shot more than ``many``, few-shot
    fewer than ``few``, medium-shot the rest."""

    many: int = Field(100, ge=1)
    few: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _few_below_many(self) -> "ShotGroups":
        if self.few > self.many + 1:
            raise ValueError("config key 'scenario.imbalance.shots': few must not exceed many + 1 "
                             "(a class cannot be both many-shot and few-shot)")
        return self


class ImbalanceConfig(Strict):
    """Per-class training-set sizes, applied by the scenario before the hold-out is taken (see
    ``cilkit.cil.scenario.imbalance_counts``). ``longtail``: the class of rank r (0..C-1) keeps
    ``floor(n_max * ratio^(-r/(C-1)))`` images; ``step``: the last ``minority_fraction`` of the
    ranks keep ``floor(n_max / ratio)``; ``counts``: explicit kept counts, one per class position
    in the run's order. Ranks are a seeded shuffle of the class positions (``ordering:
    shuffled``, seed ``seed``, default the run seed), the positions themselves (``position``:
    the first classes of the order are the largest) or the dataset's class ids (``label``: class
    0 is the largest whatever the order, CIFAR-100-LT as Cao et al. and LT-CIL build it), or
    numpy's shuffle of the counts (``numpy_shuffled``, LT-CIL's list-file loader).
    ``keep`` says which images of a class stay: a seeded draw (``random``), LT-CIL's draw
    (``numpy_shuffle``: ``numpy.random.seed(seed)``, then, class by class in label order, a
    shuffle of the class's images in file order, the first n kept) or the first n in file
    order (``first``, LT-CIL's list-file loader). ``apply_to_test`` keeps the same fraction of
    each class's test images. ``shots`` are the long-tail groups of the report: a class with more
    than ``shots.many`` training images is many-shot, fewer than ``shots.few`` few-shot, the
    others medium-shot."""

    profile: Literal["none", "longtail", "step", "counts"] = "none"
    ratio: float = Field(10.0, ge=1)  # rho = n_max / n_min
    minority_fraction: float = Field(0.5, gt=0, lt=1)  # step only
    counts: list[int] | None = None  # counts only
    ordering: Literal["shuffled", "position", "label", "numpy_shuffled"] = "shuffled"
    keep: Literal["random", "numpy_shuffle", "first"] = "random"
    seed: int | None = None  # shuffle and dropped images (default: the run seed)
    apply_to_test: bool = False
    shots: ShotGroups = Field(default_factory=lambda: ShotGroups())

    @model_validator(mode="after")
    def _counts_with_profile(self) -> "ImbalanceConfig":
        if self.profile == "counts" and not self.counts:
            raise ValueError("config key 'scenario.imbalance.counts': required by profile 'counts'")
        if self.profile != "counts" and self.counts is not None:
            raise ValueError("config key 'scenario.imbalance.counts': only used with profile 'counts'")
        if self.counts is not None and any(c < 1 for c in self.counts):
            raise ValueError("config key 'scenario.imbalance.counts': every count must be >= 1")
        return self
