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

Not in cilkit's engine (noted in configs/gdumb-cifar100-b0-10.yaml): the original's SGDR
schedule (1 warm-up epoch at lr/10, then cosine warm restarts T_0 = 1, T_mult = 2 to
``minlr``), gradient-norm clipping at 10, CutMix (p 0.5, alpha 1) and fp16 training.
"""

from __future__ import annotations

from typing import Any

import torch

from cilkit.common.errors import UserError
from cilkit.settings.registry import register_method as register
from cilkit.methods.base import Context, Method, MethodConfig
from cilkit.models import IncrementalNet, load_backbone_weights
from cilkit.common.seeding import derive_seed, seeded_generator


class GDumbConfig(MethodConfig):
    """GDumb has no options of its own: the memory size is ``memory.total`` (``K``), the
    learner's training settings are ``train``."""


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
