"""One class-incremental run, state after state, with checkpoints, resume and a state-0 cache,
recording what it prints (run.log), its epochs and states (history.jsonl) and, when asked,
TensorBoard events.

Randomness: every state draws from its own generators, seeded from ``(run seed, state)``, and
the global torch RNG is re-seeded the same way at the start of each state. A resumed run
therefore replays exactly the random numbers an uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cilkit import distributed, history, io, plugins, provenance, runlog, state0cache, tensorboard_log
from cilkit.config import RunConfig
from cilkit.data import load_dataset
from cilkit.data.base import Dataset
from cilkit.engine import Engine, EpochRecord
from cilkit.errors import UserError
from cilkit.memory import Memory
from cilkit.methods import METHODS
from cilkit.methods.base import Context, Method, TrainingRecord
from cilkit.models import load_backbone_weights
from cilkit.metrics import run_summary, score_metrics, state_accuracies
from cilkit.rundir import RESULTS_VERSION, DirectoryLock, RunLayout, check_target, clear_run, read_stats
from cilkit.runlog import log
from cilkit.scenario import Scenario
from cilkit.seeding import derive_seed, seeded_generator
from cilkit.statistics import Stats, state_statistics
from cilkit.tensorboard_log import TensorBoardLog
from cilkit.stats_tests import mean_std


def resolve_device(name: str) -> torch.device:
    """The run's device; under torchrun, each rank's own GPU (``cuda:LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config key 'device': '{name}' asked for, but no CUDA device is available")
    if name.startswith("cuda") and distributed.active():
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def free_cores() -> int:
    """The cores this process may use, shared with the other ranks of the run on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // distributed.local_world_size())


def normalisation(dataset: Dataset, scenario: Scenario) -> tuple[torch.Tensor, torch.Tensor]:
    """Known statistics, else the mean/std of the training images of state 0 (as the IL2M and
    active-IL seeds prescribe for a dataset without known statistics)."""
    if dataset.mean is not None and dataset.std is not None:
        return torch.tensor(dataset.mean), torch.tensor(dataset.std)
    mean, std = dataset.train.channel_stats(scenario.state(0).train)
    return mean, std.clamp_min(1e-3)


def build_method_and_model(config: RunConfig, dataset: Dataset) -> tuple[Method, Any, int, int]:
    """The run's method, its model (seeded from the run seed, pretrained backbone weights
    loaded if asked) and the images' (channels, size): where a bad method option, backbone or
    weights file fails. Shared by :class:`Run` and :func:`check_protocol`."""
    if not isinstance(config.method, str):
        raise ValueError("one method at a time (config.for_method(name))")
    method: Method = METHODS[config.method](config)
    torch.manual_seed(derive_seed(config.seed, "model"))
    channels, size = dataset.train.geometry
    model = method.build_model(channels, size)
    if config.model.weights is not None:  # a pretrained start (the head stays as built)
        load_backbone_weights(model.backbone, config.model.weights)
    return method, model, channels, size


def build_scenario(config: RunConfig, dataset: Dataset) -> Scenario:
    return Scenario(config.scenario, dataset.train.labels, dataset.test.labels, dataset.num_classes, config.seed,
                    dataset.name)


class Run:
    """A single-method run writing into ``run_dir``."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | os.PathLike,
        progress: bool | None = None,
        dataset: Dataset | None = None,
    ) -> None:
        if not isinstance(config.method, str):
            raise ValueError("Run takes one method; use run_methods for a comparison")
        if config.log.tensorboard:
            tensorboard_log.require()  # before any data is read or anything trains
        self.config = config
        self.layout = RunLayout(run_dir)
        self.history = history.History(self.layout.history)
        self.tensorboard: TensorBoardLog | None = None  # open while the states run
        self.progress = progress
        torch.set_num_threads(config.threads or free_cores())
        self.device = resolve_device(config.device)
        self.dataset = dataset if dataset is not None else load_dataset(config.data)
        self.scenario = build_scenario(config, self.dataset)
        self.mean, self.std = normalisation(self.dataset, self.scenario)
        self.dataset.train.to(self.device)
        self.dataset.test.to(self.device)
        self.engine = Engine(
            self.dataset, config.train, self.device, self.mean, self.std, config.amp, config.channels_last, progress,
            on_epoch=self._record_epoch, compile=config.compile,
        )
        self.method, model, self.channels, self.size = build_method_and_model(config, self.dataset)
        if config.train.sync_bn and distributed.active():
            model = distributed.global_batchnorm(model)
        self.model = model.to(self.device)
        self.memory = Memory(config.memory)
        self.statistics: Stats | None = None  # the last finished state's class statistics
        self.results = self._empty_results()

    # ----- results ---------------------------------------------------------------------------
    def _empty_results(self) -> dict[str, Any]:
        return {
            "version": RESULTS_VERSION,
            "method": self.config.method,
            "dataset": self.dataset.name,
            "num_states": self.scenario.num_states,
            "class_order": self.scenario.order[: self.scenario.ends[-1]],
            "class_names": [self.dataset.class_names[c] for c in self.scenario.order[: self.scenario.ends[-1]]],
            "state_ends": self.scenario.ends,
            "imbalance": self.scenario.imbalance,  # profile and kept images per class position
            "primary_scores": self.method.primary_scores,
            "states": [],
            "accuracy_matrix": [],
            "complete": False,
            "wall_time_s": 0.0,
            "provenance": provenance.started(self._environment()),
        }

    def _environment(self) -> dict[str, Any]:
        c = self.config
        return provenance.environment(self.device, torch.get_num_threads(), c.amp, c.channels_last)

    def _summarise(self) -> None:
        r = self.results
        r.update(run_summary(r["states"], r["accuracy_matrix"]))
        r["complete"] = len(r["states"]) == self.scenario.num_states
        if "provenance" in r:
            r["provenance"]["finished"] = provenance.now()
            r["provenance"]["compile"] = ("torch.compile" if self.engine.compile else
                                          "eager (torch.compile failed)" if self.config.compile else "eager")

    # ----- the loop --------------------------------------------------------------------------
    def execute(self, resume: bool = False, until_state: int | None = None) -> dict[str, Any]:
        """Run (or continue) the states; ``until_state`` stops after that state (for tests).
        Every :func:`~cilkit.runlog.log` line is copied to ``run.log`` meanwhile."""
        io.make_dir(self.layout.root)
        with runlog.tee(self.layout.run_log):
            start = self._restore() if resume else self._start_fresh()
            log(f"[{self.config.method}] {self.setup_line()}")
            kept = self.history.keep_states(start - 1)  # drop what an interrupted attempt wrote after
            last = self.scenario.num_states - 1 if until_state is None else min(until_state, self.scenario.num_states - 1)
            with self._tensorboard(kept):
                for b in range(start, last + 1):
                    self._run_state(b)
        return self.results

    @contextlib.contextmanager
    def _tensorboard(self, kept: list[dict[str, Any]]) -> Iterator[None]:
        """With ``log.tensorboard``: fresh event files holding the ``kept`` history (a
        resume's finished states), open while the states run."""
        if not self.config.log.tensorboard or not distributed.is_main():
            yield
            return
        self.tensorboard = TensorBoardLog(self.layout.tb, fresh=True)
        try:
            self.tensorboard.replay(kept, self.results["accuracy_matrix"])
            yield
        finally:
            self.tensorboard.close()
            self.tensorboard = None

    def _record_epoch(self, ctx: Context, record: EpochRecord) -> None:
        """An epoch of any fit of the run (the engine's callback): a history line."""
        line = history.epoch_line(ctx.state.index, ctx.round, record)
        self.history.append(line)
        if self.tensorboard is not None:
            self.tensorboard.epoch(line)

    def _record_state(self, b: int, entry: dict[str, Any]) -> None:
        """A finished state: a history line, written before its checkpoint (a resume after
        the previous state drops it again)."""
        line = history.state_line(b, entry)
        self.history.append(line)
        if self.tensorboard is not None:
            self.tensorboard.state(line, self.results["accuracy_matrix"])

    def setup_line(self) -> str:
        """What shapes the run and its speed, in one line (the first the run prints)."""
        c, sc = self.config, self.scenario
        sizes = [sc.ends[0]] + [e - s for s, e in zip(sc.ends, sc.ends[1:])]
        steps = f"{sizes[0]}" + (f" + {len(sizes) - 1} x {sizes[1]}" if len(set(sizes[1:])) == 1 and len(sizes) > 1
                                  else "".join(f" + {n}" for n in sizes[1:]))
        m = c.memory
        memory = (f"{m.total} exemplars" if m.total else f"{m.per_class} per class" if m.per_class else "none")
        precision = ("bf16 autocast" if c.amp else "fp32") + (", torch.compile" if c.compile else "")
        return (f"{self.dataset.name}: {self.dataset.num_classes} classes, images {self.channels}x{self.size}x"
                f"{self.size}; {sc.num_states} states of {steps} classes; memory {memory}"
                f"{f' ({m.selection})' if m.enabled else ''}; device {self.device}, threads {torch.get_num_threads()}, "
                f"{precision}{', channels-last' if c.channels_last else ''}; seed {c.seed}")

    def _start_fresh(self) -> int:
        io.write_yaml(self.layout.config, self.config.to_dict())
        return 0

    def _context(self, b: int) -> Context:
        return Context(
            config=self.config,
            scenario=self.scenario,
            dataset=self.dataset,
            state=self.scenario.state(b),
            model=self.model,
            memory=self.memory,
            device=self.device,
            generator=seeded_generator(self.config.seed, "state", b),
            mean=self.mean,
            std=self.std,
            engine=self.engine,
            layout=self.layout,
        )

    def _run_state(self, b: int) -> None:
        t0 = time.perf_counter()
        torch.manual_seed(derive_seed(self.config.seed, "torch", b))
        ctx = self._context(b)
        st = ctx.state
        name = self.config.method
        log(
            f"[{name}] state {b + 1}/{self.scenario.num_states}: classes {st.new.start}..{st.new.stop - 1} "
            f"new, {st.n_seen} seen"
        )
        self.method.before_state(ctx)
        ctx.trained = TrainingRecord(old_exemplars=self.memory.indices(st.old))
        train_info = self._train(ctx)
        self._update_memory(ctx)
        self.method.after_state(ctx)
        ctx.statistics = self._statistics(ctx)
        entry = self._evaluate(ctx)
        entry.update(train_info)
        entry.update(ctx.info)
        entry["memory_size"] = len(self.memory)
        entry["time_s"] = time.perf_counter() - t0
        self.results["states"].append(entry)
        self.results["accuracy_matrix"].append(entry.pop("accuracy_per_state"))
        self.results["wall_time_s"] += entry["time_s"]
        self._summarise()
        distributed.check_agreement(f"state {b + 1}", self._digest(entry))
        self._record_state(b, entry)
        self._save_state(ctx)
        old = f", old {entry['top1_old']:.1f}" if entry["top1_old"] is not None else ""
        log(f"[{name}] state {b + 1}: top-1 {entry['top1']:.2f}{old}, new {entry['top1_new']:.1f} ({entry['time_s']:.1f} s)")

    def _digest(self, entry: dict[str, Any]) -> str:
        """What every rank must agree on after a state: the model, the memory, the method's
        state and the state's accuracies."""
        scores = [entry.get(k) for k in ("top1", "top1_old", "top1_new", "balanced_top1", "val_top1")]
        return distributed.digest([*self.model.state_dict().values(), *_tensors(self.memory.state_dict()),
                                   *_tensors(self.method.state_dict()), scores])

    def _train(self, ctx: Context) -> dict[str, Any]:
        b = ctx.state.index
        rounds = self.method.rounds(ctx)
        cache = self._state0_cache_path() if b == 0 and rounds == 1 else None
        cached = distributed.from_main(lambda: state0cache.load_entry(cache, self.model, log)) if cache else None
        if cache is not None and cached is not None:
            distributed.sync_state(self.model)  # rank 0 read the entry
            log(f"[{self.config.method}] state 1: reusing the cached state-0 model {cache} "
                "(same data content, order, model, state-0 code and options, training settings and seed)")
            indices = self._train_set(ctx)
            return {"train_images": int(indices.numel()), **cached, "state0_cached": True}
        info: dict[str, Any] = {}
        seconds = 0.0
        for r in range(rounds):
            ctx.round = r
            info.update(self._fit_round(ctx, f"state {b + 1}" + (f" round {r + 1}" if rounds > 1 else "")))
            seconds += info["train_seconds"]
        info["train_seconds"] = seconds
        if cache is not None:
            state0cache.store_entry(cache, self.model, info, log)
            info["state0_cached"] = False
        return info

    def _train_set(self, ctx: Context) -> torch.Tensor:
        """The round's training indices from the method, recorded as trained on."""
        indices = self.method.train_set(ctx)
        assert ctx.trained is not None
        ctx.trained.rounds.append(indices)
        return indices

    def _fit_round(self, ctx: Context, desc: str) -> dict[str, Any]:
        indices = self._train_set(ctx)
        train = self.config.train
        b = ctx.state.index
        fit = self.engine.fit(ctx, self.method, indices, train.epochs_of(b), train.lr_of(b), train.schedule, desc=desc)
        final = fit["epoch_losses"][-1] if fit["epoch_losses"] else None
        if stalled(fit["first_loss"], final):
            log(f"[{self.config.method}] warning: {desc} ended with loss {final:.3f}, about where it started "
                f"({fit['first_loss']:.3f} on its first batch): the model may have learned nothing; try another "
                "learning rate or seed (see cilkit info)")
        return {
            "train_images": int(indices.numel()),
            "train_seconds": fit["train_seconds"],
            "images_per_second": fit["images_per_second"],
            "first_loss": fit["first_loss"],
            "final_loss": final,
        }

    def _update_memory(self, ctx: Context) -> None:
        st = ctx.state
        candidates = self.method.memory_candidates(ctx)
        assert ctx.trained is not None
        ctx.trained.new_images = candidates
        pos = self.scenario.train_pos[candidates]
        new = {c: candidates[pos == c] for c in st.new}
        self.memory.update(  # its own generator: a state-0 cache hit (no training draws) changes nothing
            st.n_seen, new, lambda idx: self.engine.train_features(self.model, idx),
            seeded_generator(self.config.seed, "memory", st.index),
        )

    def _evaluate(self, ctx: Context) -> dict[str, Any]:
        st = ctx.state
        out = self.engine.infer(self.model, self.dataset.test, st.test)
        labels = ctx.targets(out["labels"])
        scores = self.method.predict(ctx, out)
        extras = self.method.extra_scores(ctx, out)
        entry: dict[str, Any] = {"state": st.index, "classes_seen": st.n_seen, "new_classes": list(st.new)}
        entry.update(score_metrics(scores, labels, st.n_old, self.scenario.ends[: st.index + 1]))
        entry["variants"] = {k: state_accuracies(v, labels, st.n_old) for k, v in extras.items()}
        if self.config.scenario.val_per_class > 0:
            entry.update(self._validate(ctx))
        arrays = {"logits": out["logits"].numpy(), "labels": labels.numpy(), "scores": scores.numpy()}
        arrays.update({f"scores_{k}": v.numpy() for k, v in extras.items()})
        io.write_npz(self.layout.scores(st.index), **arrays)
        return entry

    def _validate(self, ctx: Context) -> dict[str, float | None]:
        """Top-1 with the method's own scores on the held-out validation images of every seen
        class (``scenario.val_per_class``): what ``cilkit tune`` ranks by, never the test set."""
        out = self.engine.infer(self.model, self.dataset.train, self.scenario.val_indices(ctx.state.n_seen))
        acc = state_accuracies(self.method.predict(ctx, out), ctx.targets(out["labels"]), ctx.state.n_old)
        return {"val_top1": acc["top1"], "val_balanced_top1": acc["balanced_top1"]}

    def _statistics(self, ctx: Context) -> Stats:
        """The state's class statistics (:mod:`cilkit.statistics`) from what it trained on,
        written to ``stats/state_XX.json``; kept as the history of the next state."""
        assert ctx.trained is not None
        stats = state_statistics(ctx, ctx.trained, self.statistics)
        io.write_json(self.layout.stats(ctx.state.index), stats)
        for message in self.method.statistics_warnings(ctx, stats):
            log(f"[{self.config.method}] warning: state {ctx.state.index + 1}: {message}")
        self.statistics = stats
        return stats

    # ----- files -----------------------------------------------------------------------------
    def _save_state(self, ctx: Context) -> None:
        if not distributed.is_main():
            return
        b = ctx.state.index
        io.write_json(self.layout.memory(b), self._memory_record())
        io.write_torch(self.layout.checkpoint(b), self._checkpoint(b))
        if self.config.keep_checkpoints == "last":
            for state, old in self.layout.checkpoints():
                if state != b:
                    old.unlink()
        io.write_json(self.layout.results, self.results)

    def _checkpoint(self, b: int) -> dict[str, Any]:
        """What a resume needs after state ``b``: the model, the method's and the memory's
        state, the class statistics (the history IL2M's next state reads) and the results so
        far. No optimiser (every state, and every round, starts a fresh one) and no RNG state
        (every state re-seeds its generators from ``(seed, state)``)."""
        return {
            "state": b,
            "num_classes": self.model.num_classes,
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "memory": self.memory.state_dict(),
            "statistics": json.dumps(self.statistics),
            "results": json.dumps(self.results),
            "config": json.dumps(self.config.to_dict()),
        }

    def _memory_record(self) -> dict[str, Any]:
        """Exemplar ids per class (original class id -> training-set indices, priority order)."""
        return {
            "selection": self.config.memory.selection,
            "exemplars": {
                str(self.scenario.order[int(c)]): ids for c, ids in self.memory.as_lists().items()
            },
        }

    def _restore(self) -> int:
        found = distributed.from_main(self._read_checkpoint)  # rank 0 reads, every rank restores
        if found is None:
            log(f"[{self.config.method}] no checkpoint in {self.layout.root}: starting from state 1")
            return self._start_fresh()
        path, ckpt = found
        if "config" in ckpt:
            self._check_resume_config(json.loads(ckpt["config"]), path)
        results = json.loads(ckpt["results"])
        if results.get("version", 1) > RESULTS_VERSION:
            raise UserError(f"checkpoint '{path}' was written by a newer cilkit (results version "
                            f"{results['version']}; this one reads up to {RESULTS_VERSION})")
        grow = ckpt["num_classes"] - self.model.num_classes
        if grow > 0:
            self.model.add_classes(grow)
        self.model.load_state_dict(ckpt["model"])
        self.method.load_state_dict(ckpt["method"])
        self.memory.load_state_dict(ckpt["memory"])
        self.results = results
        if "provenance" in results:
            ranks = results["provenance"].get("ranks", 1)
            if ranks != distributed.world_size():
                log(f"[{self.config.method}] warning: the finished states ran on {ranks} process(es), the rest runs "
                    f"on {distributed.world_size()}: the batches are split differently, so the remaining states' "
                    "numbers differ from an uninterrupted run")
            results["provenance"] = provenance.resumed(results["provenance"], self._environment())
        b = int(ckpt["state"])
        self.statistics = (json.loads(ckpt["statistics"]) if "statistics" in ckpt  # checkpoints of cilkit <= 0.1.0:
                           else distributed.from_main(lambda: read_stats(self.layout.stats(b), b)))
        log(f"[{self.config.method}] resuming {self.layout.root} after state {b + 1}/{self.scenario.num_states}")
        return b + 1

    def _read_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        ckpts = self.layout.checkpoints()
        if not ckpts:
            return None
        path = ckpts[-1][1]
        try:
            return path, io.load_torch(path)
        except Exception as e:  # a corrupt or foreign file
            raise UserError(f"checkpoint '{path}' cannot be read: {e.__class__.__name__}") from None

    def _check_resume_config(self, saved: dict[str, Any], path: Path) -> None:
        """Refuse to resume when the run's config.yaml no longer says what the checkpoint was
        made with (every key but :data:`RESUME_FREE_KEYS`)."""
        keys = config_differences(self.config.to_dict(), saved)
        if keys:
            shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
            raise UserError(f"--resume: '{self.layout.config}' differs from checkpoint '{path}' in {shown}: "
                            "restore those settings, or start a new run")

    def _state0_cache_path(self) -> Path | None:
        """The cache entry for this run's state 0 (see :mod:`cilkit.state0cache` for the key)."""
        c = self.config
        if c.state0_cache is None:
            return None
        first = torch.tensor(self.scenario.order[: self.scenario.ends[0]])
        state0_images = torch.nonzero(torch.isin(self.dataset.train.labels, first)).flatten()
        key = {
            "data": self.dataset.train.content_digest(state0_images),
            "augment": repr(self.dataset.augment),
            "normalisation": [self.mean.tolist(), self.std.tolist()],
            "order": self.scenario.order[: self.scenario.ends[0]],
            "val_per_class": c.scenario.val_per_class,
            **({"imbalance": self.scenario.imbalance} if c.scenario.imbalance.profile != "none" else {}),
            "model": {"config": c.model.model_dump(mode="json"), **state0cache.model_signature(self.model),
                      **({"weights_file": state0cache.file_stamp(c.model.weights)} if c.model.weights else {})},
            **({"plugins": plugins.source_digest(c.plugins)} if c.plugins else {}),
            "method": state0cache.method_signature(self.method),
            "train": {
                "epochs": c.train.epochs_of(0),
                "lr": c.train.lr_of(0),
                "batch_size": c.train.batch_size,
                "momentum": c.train.momentum,
                "weight_decay": c.train.weight_decay,
                "schedule": c.train.schedule.model_dump(mode="json"),
            },
            "seed": c.seed,
            # data-parallel training: each rank's slice, its BatchNorm statistics
            **({"ranks": distributed.world_size(), "sync_bn": c.train.sync_bn} if distributed.active() else {}),
            "amp": c.amp,
            "channels_last": c.channels_last,
            "device": self.device.type,
        }
        root = Path(os.path.expanduser(c.state0_cache))
        return state0cache.cache_file(root, self.dataset.name, key)


STALL_RATIO = 0.9


def stalled(first_loss: float | None, final_loss: float | None) -> bool:
    """A fit that ended (last epoch's mean loss) within 10% of its first batch's loss: a model
    that learned nothing (e.g. iCaRL's first state stuck at ln 2 per class under plain SGD)."""
    return first_loss is not None and final_loss is not None and first_loss > 0 and \
        final_loss >= STALL_RATIO * first_loss


RESUME_FREE_KEYS = frozenset({"name", "threads", "keep_checkpoints", "state0_cache", "log", "plugins", "compile",
                              "dist_timeout_s"})
# ^ keys a resumed run may change: they shape no result (threads: set explicitly, see cmd_run;
#   log: a resume rebuilds the TensorBoard events of the finished states from history.jsonl;
#   plugins: where the plugin files are, which a moved file makes the user edit)


def _tensors(obj: Any) -> list[Any]:
    """The tensors and plain values inside nested dicts and lists, in a fixed order."""
    if isinstance(obj, dict):
        return [v for k in sorted(obj, key=str) for v in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [v for item in obj for v in _tensors(item)]
    return [obj]


def config_differences(now: dict[str, Any], then: dict[str, Any]) -> list[str]:
    """The dotted keys in which two configs differ, but those a resumed run may change
    (:data:`RESUME_FREE_KEYS`)."""
    a, b = _flatten(now), _flatten(then)
    return sorted(k for k in a.keys() | b.keys() if k.split(".")[0] not in RESUME_FREE_KEYS and a.get(k) != b.get(k))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def with_resolved_threads(config: RunConfig) -> RunConfig:
    """``threads: null`` resolved to the cores free to this process, so that config.yaml
    records the count the numbers depend on and a resume uses the same."""
    return config if config.threads is not None else config.model_copy(update={"threads": free_cores()})


def check_protocol(config: RunConfig, dataset: Dataset | None = None) -> Dataset:
    """Load the data (unless ``dataset`` is given) and build what can fail in every method's run
    (device, scenario, method options, model, weights, the tensorboard package) without writing
    anything and without the work a run does next (normalisation statistics, moving data to the
    device): a bad data root, an impossible scenario or an unknown backbone fails here, before a
    run directory is created or touched. Returns the dataset."""
    if config.log.tensorboard:
        tensorboard_log.require()
    resolve_device(config.device)
    dataset = dataset if dataset is not None else load_dataset(config.data)
    build_scenario(config, dataset)
    for name in config.methods:
        build_method_and_model(config.for_method(name), dataset)
    return dataset


def run_methods(
    config: RunConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool | None = None,
    overwrite: bool = False,
    dataset: Dataset | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every method of ``config`` on the same protocol; one sub-directory per method when
    there are several. Returns ``{method: results}``. With ``runs: R > 1`` see
    :func:`repeat_runs`.

    The directory is claimed first: a fresh run refuses one that holds another run (unless
    ``overwrite``, which clears that run's files) or files cilkit did not write, and the run
    holds an exclusive lock on it to the end (a second run into it fails at once)."""
    out = Path(out_dir)
    if not resume:
        config = with_resolved_threads(config)
        distributed.from_main(lambda: check_target(out, overwrite))
        dataset = dataset if dataset is not None else check_protocol(config)
    io.make_dir(out)
    with DirectoryLock(out):
        if not resume:
            distributed.from_main(lambda: check_target(out, overwrite))  # again, now that no other run can write here
            if overwrite:
                clear_run(out)
        with runlog.tee(RunLayout(out).run_log):  # a comparison's parent logs every method's lines
            return _run_claimed(config, out, resume, progress, dataset)


def _run_claimed(
    config: RunConfig, out: Path, resume: bool, progress: bool | None, dataset: Dataset | None
) -> dict[str, dict[str, Any]]:
    if config.runs > 1:
        return repeat_runs(config, out, resume, progress, dataset)
    if isinstance(config.method, str):
        return {config.method: Run(config, out, progress, dataset).execute(resume=resume)}
    if not resume:
        io.write_yaml(RunLayout(out).config, config.to_dict())
    results = {}
    dataset = dataset if dataset is not None else load_dataset(config.data)  # read once, shared by every method
    for name in config.methods:
        sub = config.for_method(name)
        results[name] = Run(sub, out / name, progress, dataset).execute(resume=resume and (out / name).exists())
    return results


def repeat_dirs(config: RunConfig, out_dir: str | os.PathLike) -> list[Path]:
    """The run directories of ``runs: R``: ``<out>/run_<k>`` for one method, else
    ``<out>/<method>/run_<k>``."""
    out = Path(out_dir)
    bases = [out] if isinstance(config.method, str) else [out / m for m in config.methods]
    return [base / f"run_{k}" for base in bases for k in range(config.runs)]


SUMMARY_KEYS = ("mean_incremental_top1", "mean_incremental_top1_excl_first",
                "mean_incremental_balanced_top1", "mean_incremental_balanced_top1_excl_first",
                "mean_incremental_val_top1", "mean_incremental_val_top1_excl_first")


def _mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean, population std (``std``) and sample std (``sample_std``, ddof=1, as the report's
    tables give it; None for one run) of the known values."""
    known = [v for v in values if v is not None]
    mean, sample_std = mean_std(known) if known else (None, None)
    return {"mean": mean, "std": float(np.std(known)) if known else None, "sample_std": sample_std,
            "values": values}


def repeat_runs(
    config: RunConfig, out: Path, resume: bool = False, progress: bool | None = None, dataset: Dataset | None = None
) -> dict[str, dict[str, Any]]:
    """Each method ``runs`` times with seeds ``seed, seed+1, ...`` (into :func:`repeat_dirs`),
    then ``<out>/summary.json``: per method, mean and std (population std, numpy's default, as
    the active-IL code reports it; ``sample_std``: ddof=1, as the report's tables) over the runs
    of the mean incremental top-1 and balanced top-1, with and without state 0. Returns ``{"<method>/run_<k>": results}``."""
    io.make_dir(out)
    if not resume:
        io.write_yaml(RunLayout(out).config, config.to_dict())
    dataset = dataset if dataset is not None else load_dataset(config.data)
    dirs = iter(repeat_dirs(config, out))
    results: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {"runs": config.runs, "seeds": [config.seed + k for k in range(config.runs)], "methods": {}}
    for name in config.methods:
        runs = []
        for k in range(config.runs):
            data = config.for_method(name).to_dict() | {"seed": config.seed + k, "runs": 1}
            d = next(dirs)
            r = Run(RunConfig.model_validate(data), d, progress, dataset).execute(resume=resume and d.exists())
            results[f"{name}/run_{k}"] = r
            runs.append(r)
        summary["methods"][name] = {key: _mean_std([r.get(key) for r in runs]) for key in SUMMARY_KEYS}
        m = summary["methods"][name]["mean_incremental_top1_excl_first"]
        if m["sample_std"] is not None:
            log(f"[{name}] {config.runs} runs: mean incremental top-1 (excl. state 1) {m['mean']:.2f} ± "
                f"{m['sample_std']:.2f} (sample std)")
    io.write_json(RunLayout(out).summary, summary)
    return results
