"""One class-incremental run, state after state (:class:`Run`).

The state loop is :meth:`Run.run_state`: before -> train -> memory -> after -> statistics ->
evaluate -> record. What the run writes and reads back is the :class:`~cilkit.run.store.RunStore`'s;
the state-0 cache key is :mod:`cilkit.run.state0cache`'s; several methods and seeds are
:mod:`cilkit.runs.multirun`'s.

Randomness: every state draws from its own generators, seeded from ``(run seed, state)``, and
the global torch RNG is re-seeded the same way at the start of each state. A resumed run
therefore replays exactly the random numbers an uninterrupted run would have drawn.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
from typing import Any

import numpy as np
import torch

from cilkit.common import distributed, io, omp, runlog
from cilkit.training.class_statistics import state_statistics
from cilkit.settings.config import RunConfig
from cilkit.settings.overrides import method_label
from cilkit.data import load_dataset
from cilkit.data.base import Dataset
from cilkit.data.fingerprint import data_change, fingerprint
from cilkit.training.engine import Engine
from cilkit.common.errors import RunDiverged, UserError, divergence_text
from cilkit.cil.memory import Memory
from cilkit.training.protocol import Context, EpochRecord, FitSpec, StateRecord, TrainingRecord, freeze
from cilkit.cil.metrics import add_shot_figures, score_metrics, state_accuracies
from cilkit.models import IncrementalLinear
from cilkit.cil.rectify import ClassStatistics
from cilkit.cil.scenario import describe_imbalance
from cilkit.run import accounting, provenance, state0cache, tensorboard
from cilkit.rundir.layout import RunLayout, outermost_run
from cilkit.run.setup import (build_method_and_model, build_scenario, free_cores, idle_milestones,
                              memory_covers_old_data, normalisation, resolve_device, threads_source)
from cilkit.run.health import divergence_advice, stall_message, stalled
from cilkit.run.store import RunStore, checkpoint_parts, empty_results, tensors_of
from cilkit.common.runlog import log
from cilkit.common.seeding import derive_seed, seeded_generator

def ranks_text() -> str:
    """``, 2 ranks (gloo)`` under torchrun; nothing in one process."""
    return f", {distributed.world_size()} ranks ({distributed.backend()})" if distributed.active() else ""


class Run:
    """A single-method run writing into ``run_dir``."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | os.PathLike,
        progress: bool | None = None,
        dataset: Dataset | None = None,
    ) -> None:
        if not isinstance(config.method, str) or config.methods:
            raise ValueError("Run takes one method, its overrides resolved (RunConfig.for_method); use run_methods "
                             "for a comparison")
        if config.log.tensorboard:
            tensorboard.require()  # before any data is read or anything trains
        self.config = config
        self.tag = method_label(config.method, config.to_dict())  # the method as its lines name it
        self.layout = RunLayout(run_dir)
        torch.set_num_threads(config.threads or free_cores())
        self.device = resolve_device(config.device)
        self.dataset = dataset if dataset is not None else load_dataset(config.data)
        self.scenario = build_scenario(config, self.dataset)
        self.mean, self.std = normalisation(self.dataset, self.scenario)
        self.dataset.train.to(self.device)
        self.dataset.test.to(self.device)
        self.engine = Engine(
            self.dataset, config.train.eval_batch_size, self.device, self.mean, self.std, config.amp,
            config.channels_last, progress,
            on_epoch=self._record_epoch, compile=config.compile,
        )
        self.method, model, self.channels, self.size = build_method_and_model(config, self.dataset)
        if config.train.sync_bn and distributed.active():
            model = distributed.global_batchnorm(model)
        self.model = model.to(self.device)
        accounting.check_budget(config.memory, self.model)  # before anything trains
        self.image_bytes = accounting.stored_image_bytes(self.dataset.train)  # one training image as stored
        self.memory = Memory(config.memory)
        self.statistics: ClassStatistics | None = None  # the last finished state's class statistics
        self.store = RunStore(self.layout, config, empty_results(
            config, self.dataset.name, self.dataset.class_names, self.scenario, self.method.primary_scores,
            self._environment()))

    @property
    def results(self) -> dict[str, Any]:
        return self.store.results

    @functools.cache
    def data_fingerprint(self) -> dict[str, Any]:
        """Digests of every training and test image and label, in order, and each split's
        images per class (:func:`cilkit.data.fingerprint.fingerprint`; checkpointed: a resume
        on other data is refused, naming the split that changed)."""
        return fingerprint(self.dataset)

    def _environment(self) -> dict[str, Any]:
        c = self.config
        return provenance.environment(self.device, torch.get_num_threads(), c.amp, c.channels_last)

    # ----- the states ------------------------------------------------------------------------
    def execute(self, resume: bool = False, until_state: int | None = None) -> dict[str, Any]:
        """Run (or continue) the states; ``until_state`` stops after that state (for tests).
        Every :func:`~cilkit.common.runlog.log` line is copied to ``run.log`` meanwhile. A fit
        whose loss or parameters go non-finite ends the run with :class:`RunDiverged` (recorded
        by :meth:`_diverged`; the finished states' checkpoints stay)."""
        io.make_dir(self.layout.root)
        # an error that ends the run goes to run.log too; the run holds the machine (cilkit.common.omp)
        with runlog.tee(self.layout.run_log), omp.holding():
            start = self._restore() if resume else self.store.start_fresh()
            self._clear_divergence()  # running again: no longer a diverged run (a refused resume keeps it)
            log(f"[{self.tag}] {self.setup_line()}")
            for warning in (memory_covers_old_data(self.config, self.scenario),
                            idle_milestones(self.config, self.scenario)):
                if warning is not None:
                    log(f"[{self.tag}] warning: {warning}")
            last = self.scenario.num_states - 1 if until_state is None else min(until_state, self.scenario.num_states - 1)
            try:
                with self.store.recording(start):
                    for b in range(start, last + 1):
                        self.run_state(b)
            except RunDiverged as e:  # recorded, its one line in run.log: the finished states stay
                diverged = self._diverged(e.record)
                runlog.record_failure(diverged)
                raise diverged from None
            except Exception as e:
                if isinstance(e, UserError):  # e.g. a disk that filled while a state ran: its one line in run.log
                    runlog.record_failure(e)
                else:  # a bug (ours or a plugin's): its traceback ends with the way on
                    e.add_note(f"the finished states are saved: after the fix, continue the run with "
                               f"cilkit run --resume {outermost_run(self.layout.root)}")
                raise
        return self.results

    # ----- divergence --------------------------------------------------------------------------
    def _diverged(self, where: dict[str, Any]) -> RunDiverged:
        """The run's :class:`RunDiverged` for the engine's ``where``: with the method, seed and
        what to try, written to ``diverged.json``; results.json is removed (a run that diverged
        claims no results; its finished states stay in their checkpoints, which a resume reads)."""
        finished = len(self.results["states"])
        record = {**where, "method": str(self.config.method), "label": self.tag, "seed": self.config.seed,
                  "finished_states": finished}
        kept = f"its {finished} finished state(s) are kept" if finished else "no state had finished"
        record["message"] = (f"[{self.tag}] training diverged in {divergence_text(record)}; try "
                             f"{divergence_advice(record, str(self.config.method), type(self.method))}; {kept}; "
                             f"{self.layout.diverged} records it")
        io.write_json(self.layout.diverged, record)
        if distributed.is_main():
            self.layout.results.unlink(missing_ok=True)
        return RunDiverged(record)

    def _clear_divergence(self) -> None:
        """Remove the record of an earlier attempt that diverged (rank 0)."""
        if distributed.is_main():
            self.layout.diverged.unlink(missing_ok=True)

    def context(self, b: int) -> Context:
        """The context state ``b`` starts with (its generator seeded from ``(seed, "state", b)``,
        the teacher a frozen copy of the model as it is now, nothing trained on yet)."""
        return Context(
            config=self.config, scenario=self.scenario, dataset=self.dataset, state=self.scenario.state(b),
            model=self.model, memory=self.memory, device=self.device,
            generator=seeded_generator(self.config.seed, "state", b), mean=self.mean, std=self.std,
            engine=self.engine, fit=FitSpec.of_state(self.config.train, b), record=StateRecord(),
            teacher=self._teacher(b), trained=TrainingRecord(old_exemplars=self.memory.indices(self.scenario.state(b).old)),
        )

    def run_state(self, b: int) -> None:
        """One state: before -> train -> memory -> after -> statistics -> evaluate -> record."""
        t0 = time.perf_counter()
        torch.manual_seed(derive_seed(self.config.seed, "torch", b))
        st = self.scenario.state(b)
        log(f"[{self.tag}] state {b + 1}/{self.scenario.num_states}: classes {st.new.start}.."
            f"{st.new.stop - 1} new, {st.n_seen} seen")
        ctx = self.context(b)
        self.method.before_state(ctx)
        ctx = dataclasses.replace(ctx, fit=self.method.fit_spec(ctx, ctx.fit))
        train_info, ctx = self._train(ctx)
        ctx = self._update_memory(ctx)
        self.method.after_state(ctx)
        ctx = dataclasses.replace(ctx, statistics=self._statistics(ctx))
        entry = {**self._evaluate(ctx), **train_info, **self._method_results(ctx), "memory_size": len(self.memory),
                 "accounting": accounting.state_accounting(self.model, len(self.memory), self.image_bytes,
                                                           self.config.memory.budget_bytes),
                 "time_s": time.perf_counter() - t0}
        distributed.check_agreement(f"state {b + 1}", self._digest(entry))
        self.store.record_state(entry, self._compiled())
        self._save_state(ctx)
        old = f", old {entry['top1_old']:.1f}" if entry["top1_old"] is not None else ""
        log(f"[{self.tag}] state {b + 1}: top-1 {entry['top1']:.2f}{old}, new {entry['top1_new']:.1f} "
            f"({entry['time_s']:.1f} s)")

    def setup_line(self) -> str:
        """What shapes the run and its speed, in one line (the first the run prints), ending with
        the imbalance profile as the protocol headers of the tables name it (none when balanced)."""
        c, sc = self.config, self.scenario
        sizes = [sc.ends[0]] + [e - s for s, e in zip(sc.ends, sc.ends[1:])]
        steps = f"{sizes[0]}" + (f" + {len(sizes) - 1} x {sizes[1]}" if len(set(sizes[1:])) == 1 and len(sizes) > 1
                                  else "".join(f" + {n}" for n in sizes[1:]))
        m = c.memory
        memory = (f"{m.total} exemplars" if m.total else f"{m.per_class} per class" if m.per_class else
                  f"{m.budget_bytes} bytes shared with the model" if m.budget_bytes else "none")
        precision = ("bf16 autocast" if c.amp else "fp32") + (", torch.compile" if c.compile else "")
        return (f"{self.dataset.name}: {self.dataset.num_classes} classes, images {self.channels}x{self.size}x"
                f"{self.size}; {sc.num_states} states of {steps} classes; memory {memory}"
                f"{f' ({m.selection})' if m.enabled else ''}; device {self.device}{ranks_text()}, threads "
                f"{torch.get_num_threads()} ({threads_source(c.threads)}), {omp.CHOSEN.describe()}, {precision}"
                f"{', channels-last' if c.channels_last else ''}; seed {c.seed}"
                + (f".{imbalance}" if (imbalance := describe_imbalance(sc.imbalance)) else ""))

    # ----- train -----------------------------------------------------------------------------
    def _teacher(self, b: int) -> Any:
        """A frozen copy of the model as state ``b`` starts, for a method that ``needs_teacher``
        (none in state 0)."""
        return freeze(copy.deepcopy(self.model)) if self.method.needs_teacher and b > 0 else None

    def _train(self, ctx: Context) -> tuple[dict[str, Any], Context]:
        """Train the state's rounds (or reuse the state-0 cache): what the state's results keep
        of it, and the context with what it trained on."""
        rounds = self.method.rounds(ctx)
        cache = self.state0_entry() if ctx.state.index == 0 and rounds == 1 else None
        # runs in parallel that need the same entry take turns: one trains, the others load (rank 0 reads it)
        with state0cache.entry_lock(cache if distributed.is_main() else None, log):
            return self._train_or_reuse(ctx, rounds, cache)

    def _train_or_reuse(self, ctx: Context, rounds: int, cache: state0cache.CacheEntry | None
                        ) -> tuple[dict[str, Any], Context]:
        b = ctx.state.index
        cached = distributed.from_main(lambda: state0cache.load_entry(cache, self.model, log)) if cache else None
        if cache is not None and cached is not None:
            distributed.sync_state(self.model)  # rank 0 read the entry
            log(f"[{self.tag}] state 1: reusing the cached state-0 model {cache} "
                "(same data content, order, model, code, options, training and execution settings and seed)")
            self.method.begin_round(ctx)  # what the round sets up, but for the training itself
            ctx = self._with_train_set(ctx)
            return {"train_images": int(self._trained(ctx).rounds[-1].numel()), **cached, "state0_cached": True}, ctx
        info: dict[str, Any] = {}
        seconds = 0.0
        for r in range(rounds):
            fit_info, ctx = self._fit_round(dataclasses.replace(ctx, round=r),
                                            f"state {b + 1}" + (f" round {r + 1}" if rounds > 1 else ""))
            info.update(fit_info)
            seconds += info["train_seconds"]
        info["train_seconds"] = seconds
        if cache is not None:
            state0cache.store_entry(cache, self.model, info, log)
            info["state0_cached"] = False
        return info, ctx

    @staticmethod
    def _trained(ctx: Context) -> TrainingRecord:
        assert ctx.trained is not None, "the runner records what a state trains on"
        return ctx.trained

    def _with_train_set(self, ctx: Context) -> Context:
        """The context with the round's training indices (the method's) recorded as trained on."""
        return dataclasses.replace(ctx, trained=self._trained(ctx).with_round(self.method.train_set(ctx)))

    def _fit_round(self, ctx: Context, desc: str) -> tuple[dict[str, Any], Context]:
        self.method.begin_round(ctx)
        ctx = self._with_train_set(ctx)
        indices = self._trained(ctx).rounds[-1]
        fit = self.engine.fit(ctx, self.method, indices, ctx.fit, desc=desc)
        losses = fit["epoch_losses"]
        if stalled(losses):
            log(f"[{self.tag}] warning: {stall_message(desc, losses, self.method.name)}")
        return {
            "train_images": int(indices.numel()),
            "train_seconds": fit["train_seconds"],
            "images_per_second": fit["images_per_second"],
            "first_loss": losses[0] if losses else None,  # the mean loss of the first epoch
            "final_loss": losses[-1] if losses else None,  # and of the last
        }, ctx

    def _record_epoch(self, ctx: Context, record: EpochRecord) -> None:
        """An epoch of any fit of the run (the engine's callback)."""
        self.store.record_epoch(ctx.state.index, ctx.round, record)

    def state0_entry(self) -> state0cache.CacheEntry | None:
        """The state-0 cache entry this run would use (None with ``state0_cache: null``)."""
        if self.config.state0_cache is None:
            return None
        key = state0cache.state0_key(self.config, self.dataset, self.scenario, self.model, self.method,
                                     self.mean, self.std, self.device)
        return state0cache.cache_file(self.config.state0_cache, self.dataset.name, key)

    # ----- memory, statistics, evaluation --------------------------------------------------------
    def _update_memory(self, ctx: Context) -> Context:
        """The memory after the state (the method's candidates or its own memory); the context
        with the candidates recorded."""
        st = ctx.state
        candidates = self.method.memory_candidates(ctx)
        ctx = dataclasses.replace(ctx, trained=self._trained(ctx).with_new_images(candidates))
        pos = self.scenario.train_pos[candidates]
        new = {c: candidates[pos == c] for c in st.new}
        own = self.method.memory_contents(ctx)
        if own is not None:
            if self.config.memory.budget_bytes is not None:
                raise UserError(f"method '{self.method.name}' chooses its own memory, which memory.budget_bytes "
                                "cannot size: run it with memory.total")
            self.memory.assign(st.n_seen, own)
            return ctx
        self.memory.update(  # its own generator: a state-0 cache hit (no training draws) changes nothing
            st.n_seen, new, lambda idx: self.engine.train_features(self.model, idx),
            seeded_generator(self.config.seed, "memory", st.index),
            # memory.budget_bytes: what the model leaves, the model as it is now (grown in before_state)
            total=accounting.exemplar_total(self.config.memory, self.model, self.image_bytes, st.index),
        )
        return ctx

    def _statistics(self, ctx: Context) -> ClassStatistics:
        """The state's class statistics (:mod:`cilkit.training.class_statistics`) from what it trained
        on, written to ``stats/state_XX.json``; kept as the history of the next state."""
        stats = state_statistics(ctx, self._trained(ctx), self.statistics)
        self.store.write_statistics(ctx.state.index, stats)
        for message in self.method.statistics_warnings(ctx, stats):
            log(f"[{self.tag}] warning: state {ctx.state.index + 1}: {message}")
        self.statistics = stats
        return stats

    def _evaluate(self, ctx: Context) -> dict[str, Any]:
        st = ctx.state
        out = self.engine.infer(self.model, self.dataset.test, st.test)
        labels = ctx.targets(out["labels"])
        scores = self.method.predict(ctx, out)
        extras = self.method.extra_scores(ctx, out)
        entry: dict[str, Any] = {"state": st.index, "classes_seen": st.n_seen, "new_classes": list(st.new)}
        entry.update(score_metrics(scores, labels, st.n_old, self.scenario.ends[: st.index + 1]))
        entry["variants"] = {k: state_accuracies(v, labels, st.n_old) for k, v in extras.items()}
        add_shot_figures(entry, scores, extras, labels, self.scenario.imbalance)  # long-tailed scenarios only
        if self.config.scenario.val_per_class > 0:
            entry.update(self._validate(ctx))
        arrays = {"logits": out["logits"].numpy(), "labels": labels.numpy(), "scores": scores.numpy()}
        arrays.update({f"scores_{k}": v.numpy() for k, v in extras.items()})
        arrays.update(self._classifier_arrays(out))
        self.store.write_scores(st.index, arrays)
        return entry

    def _classifier_arrays(self, out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The test features and the linear classifier of the state, for a method that keeps
        them (``stores_features``: what ``cilkit calibrate --with scail`` reads)."""
        head = self.model.head
        if not self.method.stores_features or not isinstance(head, IncrementalLinear):
            return {}
        return {"features": out["features"].numpy(), "head_weight": head.weight.detach().float().cpu().numpy(),
                "head_bias": head.bias.detach().float().cpu().numpy()}

    def _validate(self, ctx: Context) -> dict[str, float | None]:
        """Top-1 with the method's own scores on the held-out validation images of every seen
        class (``scenario.val_per_class``): what ``cilkit tune`` ranks by, never the test set."""
        out = self.engine.infer(self.model, self.dataset.train, self.scenario.val_indices(ctx.state.n_seen))
        acc = state_accuracies(self.method.predict(ctx, out), ctx.targets(out["labels"]), ctx.state.n_old)
        return {"val_top1": acc["top1"], "val_balanced_top1": acc["balanced_top1"]}

    def _method_results(self, ctx: Context) -> dict[str, Any]:
        """The method's own results of the state, under its name."""
        return {self.method.name: ctx.record.results} if ctx.record.results else {}

    # ----- records -----------------------------------------------------------------------------
    def _compiled(self) -> str:
        return ("torch.compile" if self.engine.compile else
                "eager (torch.compile failed)" if self.config.compile else "eager")

    def _digest(self, entry: dict[str, Any]) -> str:
        """What every rank must agree on after a state: the model, the memory, the method's
        state and the state's accuracies."""
        scores = [entry.get(k) for k in ("top1", "top1_old", "top1_new", "balanced_top1", "val_top1")]
        return distributed.digest([*self.model.state_dict().values(), *tensors_of(self.memory.state_dict()),
                                   *tensors_of(self.method.state_dict()), scores])

    def _save_state(self, ctx: Context) -> None:
        parts = checkpoint_parts(self.model, self.model.architecture(), self.method.state_dict(),
                                 self.memory.state_dict(), self.statistics, self.data_fingerprint())
        self.store.save_state(ctx.state.index, parts, self._memory_record(), self.method.name, ctx.record.files)

    def _memory_record(self) -> dict[str, Any]:
        """Exemplar ids per class (original class id -> training-set indices, priority order)."""
        return {
            "selection": self.config.memory.selection,
            "exemplars": {str(self.scenario.order[int(c)]): ids for c, ids in self.memory.as_lists().items()},
        }

    def _restore(self) -> int:
        restored = self.store.restore(self._environment())
        if restored is None:
            log(f"[{self.tag}] no checkpoint in {self.layout.root}: starting from state 1")
            return self.store.restart(self.method.name)
        changed = data_change(restored.data, self.dataset, self.data_fingerprint())
        if changed is not None:
            raise UserError(f"--resume: {changed.subject} is not what the finished states of {self.layout.root} "
                            f"ran on ({changed.detail}): restore it, or start a new run")
        self.model.rebuild(restored.architecture)  # the grown shape (head, backbone branches, auxiliary heads)
        self.model.load_state_dict(restored.model)
        self.method.load_state_dict(restored.method)
        self.memory.load_state_dict(restored.memory)
        self.statistics = restored.statistics
        self.store.write_results()  # results.json as the checkpoint holds them (a damaged one rebuilt)
        log(f"[{self.tag}] resuming {self.layout.root} after state {restored.state + 1}/"
            f"{self.scenario.num_states}")
        return restored.state + 1
