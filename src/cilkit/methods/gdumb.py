"""GDumb (Prabhu, Torr & Dokania, "GDumb: A Simple Approach that Questions Our Progress in
Continual Learning", ECCV 2020).

The paper states its method in words (its method section, "GDumb"), with no numbered
equation; cilkit implements its three parts (docs/methods.md, "gdumb"):

1. **Greedy class-balanced sampler.** The state's new training images arrive as a stream; for
   each image ``x`` of class ``y``, with ``M`` the memory (``K = memory.total`` slots), ``n_c``
   the images of class ``c`` in ``M`` and ``C`` the classes present in ``M`` (before ``x``)::

       if y not in C  or  n_y < floor(K / |C|):
           if |M| >= K:  remove one random image of the class with the most images
                         (ties: the class that entered M first)
           store x

   The condition, the tie rule and the random pick transcribe ``greedy_balancing_update`` of
   the GDumb agent of Mai et al.'s online continual learning survey code
   (RaptorMai/online-continual-learning, ``agents/gdumb.py``: ``k_c = mem_size //
   max(1, len(mem_img))``; ``max(mem_c.items(), key=...)`` = the first class in insertion
   order among the largest; ``random.randrange`` = the evicted image). Avalanche's
   ``GDumbPlugin`` has the same condition but replaces the *first* stored image of that class;
   we follow the random pick (the authors' code has no stream that would fix it). Under this
   rule a memory filled from empty can keep up to ``|C| - 1`` slots free (3 classes, K = 20:
   6 + 6 + 6), until a new class arrives. The authors' public code (drimpossible/GDumb, ``src/dataloader.py``
   ``gen_cl_mapping``) abstracts the stream away ("implicitly performs greedy sampling"): it
   takes the first ``K // (classes)`` images of every class at once, the balanced end state of
   the stream; we run the stream, as the paper describes.
   The stream order is a seeded permutation of ``state.train`` (``seeded_generator(seed,
   "gdumb-stream", b)``), and the evicted image is ``floor(u * n_c)`` for a uniform ``u``
   drawn per stream position from the same generator: the sampler never reads the state's
   training generator, so a state-0 cache hit or a resume draws the same memory. The rule is
   sequential (each decision reads the previous ones): it runs once per state over the
   stream in plain Python integers (``greedy_update``), outside any training loop.
2. **Learner.** At every state, state 0 included, the model is re-initialised from scratch and
   trained on the memory alone: ``before_state`` loads into the run's model a freshly built one
   (this method's ``build_model``, the config's pretrained backbone weights if any, a head over
   the seen classes), built under the torch seed ``derive_seed(seed, "gdumb-init", b)`` in a
   forked RNG; ``train_set`` is the greedy memory (a pure query). So state 0 trains on at most
   ``K`` images and is GDumb's own, never fine-tuning's cached state-0 model (the cache keys on
   this method's hooks and on ``K``, declared in ``state0_signature``).
3. **Classifier.** The logits over the seen classes (``predict``'s default). The original masks
   the scores to the classes seen so far at test time; cilkit's head only has those classes.

**The run's memory is GDumb's.** GDumb's memory is the sampler's, known before training, with
its own counts (the remainder of ``K / classes`` spread by the stream) and random evictions, so
it is not the run's quota-and-priority memory: ``memory_contents`` hands it to the run, which
then holds exactly it (``memory/state_XX.json``: original class id -> training indices, in
storage order), and the class statistics read it (``cur_mean`` over the old classes' images in
it; ``init_mean`` / ``conf`` over the new classes' picks, ``memory_candidates``;
``train_counts`` from ``train_set``). Its counts are in results.json under ``gdumb``.

**The authors' training regime** (``src/main.py``, ``src/utils.py``), which the paper's
method section does not state, is the run's to set: the SGDR schedule (1 warm-up epoch at
lr/10, then cosine warm restarts T_0 = 1, T_mult = 2 to ``minlr``) is ``train.schedule.type:
sgdr`` (``warmup_epochs: 1``, ``period: 1``, ``period_mult: 2``, ``min_lr``); the gradient
clipping at 10 is ``train.clip_grad_norm``; CutMix (Yun et al., ICCV 2019) with probability
0.5 and alpha 1 is ``gdumb.cutmix_prob`` / ``gdumb.cutmix_alpha`` (default off, the paper's
method). CutMix transcribes ``cutmix_data`` and ``rand_bbox``: per batch, mix when a uniform
draw is below ``cutmix_prob``; ``lam ~ Beta(alpha, alpha)``; a box of
``int(size * sqrt(1 - lam))`` pixels a side (rows and columns), its centre a uniform pixel,
clipped to the image, pasted from the batch under a random permutation; ``lam`` then
recomputed as the share of pixels left unpasted; the loss ``lam * CE(out, y) + (1 - lam) *
CE(out, y[perm])`` (``cutmix``, ``loss``). The draws (decision, ``lam``, permutation,
centre) come from ``seeded_generator(seed, "gdumb-cutmix", b)``, made in ``before_state``
(a resume redraws them), on the CPU: ``lam`` through two Gamma draws (Marsaglia & Tsang's
method, ``beta_draw``), where the authors call numpy's Beta.
fp16 training (``model.half()``) is not reproduced (``amp: true`` is bf16 autocast).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from cilkit.common.errors import UserError
from cilkit.settings.registry import register_method as register
from cilkit.methods.base import Batch, Context, LossTerms, Method, MethodConfig
from cilkit.models import IncrementalNet, load_backbone_weights
from cilkit.common.seeding import derive_seed, seeded_generator
from cilkit.settings.options import option


class GDumbConfig(MethodConfig):
    """GDumb's CutMix (the authors' scripts: probability 0.5, alpha 1); the memory size is
    ``memory.total`` (``K``), the learner's other training settings are ``train``."""

    cutmix_prob: float = option(0.0, ge=0, le=1, help="the chance that a batch is CutMix-ed (0: never, the "
                                "paper's method; the authors' scripts: 0.5)")
    cutmix_alpha: float = option(1.0, gt=0, help="CutMix's lam ~ Beta(alpha, alpha) (the authors': 1)")


def cutmix(x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor, cx: int, cy: int
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix of the batch ``x`` (N, C, rows, cols) with labels ``y``, as the authors'
    ``cutmix_data`` / ``rand_bbox`` given their draws: ``lam``, the permutation ``perm`` (on
    ``x``'s device) and the box centre (row ``cx``, column ``cy``). Returns the mixed images (a
    new tensor), the partner labels ``y[perm]`` and ``lam`` recomputed from the clipped box."""
    rows, cols = x.shape[2], x.shape[3]
    side = math.sqrt(1.0 - lam)
    half_r, half_c = int(rows * side) // 2, int(cols * side) // 2
    r1, r2 = min(max(cx - half_r, 0), rows), min(max(cx + half_r, 0), rows)
    c1, c2 = min(max(cy - half_c, 0), cols), min(max(cy + half_c, 0), cols)
    mixed = x.clone()
    mixed[:, :, r1:r2, c1:c2] = x[perm, :, r1:r2, c1:c2]
    return mixed, y[perm], 1.0 - (r2 - r1) * (c2 - c1) / (rows * cols)


def _gamma_draw(a: float, gen: torch.Generator) -> float:
    """One Gamma(a, 1) draw: Marsaglia & Tsang (ACM TOMS 2000); for a < 1, Gamma(a + 1) * U ** (1 / a)."""
    boost = 1.0
    if a < 1:
        boost = float(torch.rand((), generator=gen, dtype=torch.float64)) ** (1.0 / a)
        a += 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = float(torch.randn((), generator=gen, dtype=torch.float64))
        v = (1.0 + c * z) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if 0 < u and math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v * boost


def beta_draw(alpha: float, gen: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw from ``gen``: X / (X + Y) of two Gamma(alpha) draws."""
    a, b = _gamma_draw(alpha, gen), _gamma_draw(alpha, gen)
    return a / (a + b) if a + b > 0 else 0.5


def greedy_update(memory: dict[int, list[int]], images: list[int], classes: list[int], budget: int,
                  draws: list[float]) -> dict[int, list[int]]:
    """GDumb's greedy class-balanced sampler over one stream (``images[i]`` of class
    ``classes[i]``, in stream order), from ``memory`` (class -> stored images; the dict's order
    is the order in which classes entered the memory). Returns the new memory (``memory`` is
    not changed). ``draws[i]`` in [0, 1) picks the image evicted at stream position ``i``."""
    mem = {c: list(v) for c, v in memory.items()}
    counts = {c: len(v) for c, v in mem.items()}
    total = sum(counts.values())
    for x, y, u in zip(images, classes, draws):
        if y in counts and counts[y] >= budget // len(counts):
            continue
        if total >= budget:
            largest = max(counts, key=counts.__getitem__)  # the first class among the largest
            n = counts[largest]
            mem[largest].pop(min(int(u * n), n - 1))
            counts[largest] = n - 1
            total -= 1
        if y not in counts:
            mem[y], counts[y] = [], 0
        mem[y].append(x)
        counts[y] += 1
        total += 1
    return mem


@register("gdumb")
class GDumb(Method):
    description = ("GDumb: a greedy class-balanced memory of K images; the model re-initialised and "
                   "trained on the memory alone at every state")
    Config = GDumbConfig
    cfg: GDumbConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        mem = self.run_config.memory
        if not mem.total:
            raise UserError("method 'gdumb' needs memory.total (its K images) > 0; memory.per_class is not "
                            "GDumb's budget")
        self.budget = int(mem.total)
        self.buffer: dict[int, list[int]] = {}  # class position -> stored images, in entry order
        self.streamed = -1  # the last state whose stream the memory holds
        self.update: dict[str, int] = {}  # that state's stored / evicted counts (results.json)
        # the state's CutMix generator (made in before_state), kept as its state: a tensor
        self.cutmix_state: torch.Tensor | None = None

    def state0_signature(self) -> dict[str, Any]:
        return {**super().state0_signature(), "gdumb_memory_total": self.budget}  # state 0 trains on K images

    # ----- learner: a fresh model at every state -------------------------------------------------
    def fresh_model(self, ctx: Context) -> IncrementalNet:
        """A model as built from scratch for state ``b`` (seeded from ``(seed, b)``), with a head
        over the seen classes."""
        channels, size = ctx.dataset.train.geometry
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(ctx.config.seed, "gdumb-init", ctx.state.index))
            model = self.build_model(channels, size)
            if ctx.config.model.weights is not None:
                load_backbone_weights(model.backbone, ctx.config.model.weights)
            model.add_classes(ctx.state.n_seen)
        return model

    def before_state(self, ctx: Context) -> None:
        super().before_state(ctx)
        ctx.model.load_state_dict(self.fresh_model(ctx).state_dict())
        self.cutmix_state = seeded_generator(ctx.config.seed, "gdumb-cutmix", ctx.state.index).get_state()

    # ----- CutMix (the authors' regime; off by default) ----------------------------------------------
    def mix_inputs(self, ctx: Context, batch: Batch) -> Batch:
        """With probability ``cutmix_prob``, the batch CutMix-ed (``cutmix``); else unchanged."""
        x, p = batch.x, self.cfg.cutmix_prob
        if p == 0 or x.dim() != 4 or x.shape[0] == 0:
            return batch
        if self.cutmix_state is None:
            raise RuntimeError("gdumb: CutMix's generator is made in before_state")
        gen = torch.Generator()
        gen.set_state(self.cutmix_state)
        try:
            if float(torch.rand((), generator=gen, dtype=torch.float64)) >= p:
                return batch
            lam = beta_draw(self.cfg.cutmix_alpha, gen)
            perm = torch.randperm(x.shape[0], generator=gen)
            cx = int(torch.randint(x.shape[2], (), generator=gen))
            cy = int(torch.randint(x.shape[3], (), generator=gen))
        finally:
            self.cutmix_state = gen.get_state()
        mixed, partner, lam = cutmix(x, batch.y, lam, perm.to(x.device), cx, cy)
        return dataclasses.replace(batch, x=mixed, y_partner=partner, lam=lam)

    def loss(self, ctx: Context, batch: Batch, out: dict[str, Any]) -> LossTerms:
        """Cross-entropy; on a CutMix-ed batch ``lam * CE(y) + (1 - lam) * CE(y_partner)``."""
        if batch.y_partner is None:
            return super().loss(ctx, batch, out)
        logits = self.class_logits(ctx, out)
        return {"ce": batch.lam * F.cross_entropy(logits, batch.y)
                + (1.0 - batch.lam) * F.cross_entropy(logits, batch.y_partner)}

    # ----- sampler -----------------------------------------------------------------------------------
    def begin_round(self, ctx: Context) -> None:
        """Stream the state's new images through the greedy sampler (once per state)."""
        b = ctx.state.index
        if self.streamed == b:
            return
        if self.streamed != b - 1:
            raise RuntimeError(f"gdumb: the memory holds state {self.streamed + 1}, not state {b} (before {b + 1})")
        train = ctx.state.train
        gen = seeded_generator(ctx.config.seed, "gdumb-stream", b)
        stream = train[torch.randperm(train.numel(), generator=gen)]
        draws = torch.rand(train.numel(), generator=gen, dtype=torch.float64)
        before = {c: set(v) for c, v in self.buffer.items()}
        self.buffer = greedy_update(self.buffer, stream.tolist(), ctx.scenario.train_pos[stream].tolist(),
                                    self.budget, draws.tolist())
        self.streamed = b
        kept = sum(len(before[c] & set(v)) for c, v in self.buffer.items() if c in before)
        self.update = {"stored": sum(len(v) for v in self.buffer.values()) - kept,
                       "evicted": sum(len(v) for v in before.values()) - kept}

    def _images(self, classes: range) -> torch.Tensor:
        parts = [torch.tensor(self.buffer.get(c, []), dtype=torch.int64) for c in classes]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def _check(self, ctx: Context) -> None:
        if self.streamed != ctx.state.index:
            raise RuntimeError(f"gdumb: the memory holds state {self.streamed + 1}, not {ctx.state.index + 1} "
                               "(begin_round sets it up)")

    def train_set(self, ctx: Context) -> torch.Tensor:
        """GDumb's memory alone, class by class (each class in its storage order)."""
        self._check(ctx)
        return self._images(ctx.state.seen)

    def memory_candidates(self, ctx: Context) -> torch.Tensor:
        """The sampler's picks of the new classes (what the state trained on of them)."""
        self._check(ctx)
        return self._images(ctx.state.new)

    def memory_contents(self, ctx: Context) -> dict[int, torch.Tensor]:
        """GDumb's memory, which the run's memory then holds exactly (``memory/state_XX.json``)."""
        self._check(ctx)
        return {c: torch.tensor(self.buffer[c], dtype=torch.int64) for c in ctx.state.seen if c in self.buffer}

    # ----- records -----------------------------------------------------------------------------------
    def after_state(self, ctx: Context) -> None:
        counts = [len(self.buffer.get(c, [])) for c in ctx.state.seen]
        ctx.record.results.update({
            "memory_images": sum(counts), "per_class_min": min(counts), "per_class_max": max(counts),
            **self.update,
        })

    # ----- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"state": self.streamed, "classes": torch.tensor(list(self.buffer), dtype=torch.int64),
                "memory": {int(c): torch.tensor(v, dtype=torch.int64) for c, v in self.buffer.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streamed = int(state["state"])
        self.buffer = {int(c): state["memory"][int(c)].tolist() for c in state["classes"].tolist()}
        self.update = {}
