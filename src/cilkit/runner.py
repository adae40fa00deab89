"""One class-incremental run, state after state, with checkpoints, resume and a state-0 cache.

Randomness: every state draws from its own generators, seeded from ``(run seed, state)``, and
the global torch RNG is re-seeded the same way at the start of each state. A resumed run
therefore replays exactly the random numbers an uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cilkit import io
from cilkit.config import RunConfig
from cilkit.data import load_dataset
from cilkit.data.base import Dataset
from cilkit.engine import Engine
from cilkit.errors import UserError
from cilkit.memory import Memory
from cilkit.methods import METHODS
from cilkit.methods.base import Context, Method, TrainingRecord
from cilkit.metrics import run_summary, score_metrics, state_accuracies
from cilkit.rundir import RESULTS_VERSION, RunLayout, read_stats
from cilkit.scenario import Scenario
from cilkit.seeding import derive_seed, seeded_generator
from cilkit.statistics import Stats, state_statistics


def log(msg: str) -> None:
    print(msg, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config key 'device': '{name}' asked for, but no CUDA device is available")
    return torch.device(name)


def free_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def normalisation(dataset: Dataset, scenario: Scenario) -> tuple[torch.Tensor, torch.Tensor]:
    """Known statistics, else the mean/std of the training images of state 0 (as the IL2M and
    active-IL seeds prescribe for a dataset without known statistics)."""
    if dataset.mean is not None and dataset.std is not None:
        return torch.tensor(dataset.mean), torch.tensor(dataset.std)
    mean, std = dataset.train.channel_stats(scenario.state(0).train)
    return mean, std.clamp_min(1e-3)


def image_geometry(dataset: Dataset) -> tuple[int, int]:
    """(channels, size) of the images the model sees."""
    x, _, _ = next(dataset.train.batches(torch.arange(1), 1, mean=torch.zeros(1), std=torch.ones(1)))
    return int(x.shape[1]), int(x.shape[-1])


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
        self.config = config
        self.layout = RunLayout(run_dir)
        self.progress = progress
        torch.set_num_threads(config.threads or free_cores())
        self.device = resolve_device(config.device)
        self.dataset = dataset if dataset is not None else load_dataset(config.data)
        self.scenario = Scenario(
            config.scenario,
            self.dataset.train.labels,
            self.dataset.test.labels,
            self.dataset.num_classes,
            config.seed,
            self.dataset.name,
        )
        self.mean, self.std = normalisation(self.dataset, self.scenario)
        self.dataset.train.to(self.device)
        self.dataset.test.to(self.device)
        self.engine = Engine(
            self.dataset, config.train, self.device, self.mean, self.std, config.amp, config.channels_last, progress
        )
        self.method: Method = METHODS[config.method](config)
        torch.manual_seed(derive_seed(config.seed, "model"))
        self.channels, self.size = image_geometry(self.dataset)
        self.model = self.method.build_model(self.channels, self.size).to(self.device)
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
            "state_ends": self.scenario.ends,
            "imbalance": self.scenario.imbalance,  # profile and kept images per class position
            "primary_scores": self.method.primary_scores,
            "states": [],
            "accuracy_matrix": [],
            "complete": False,
            "wall_time_s": 0.0,
        }

    def _summarise(self) -> None:
        r = self.results
        r.update(run_summary(r["states"], r["accuracy_matrix"]))
        r["complete"] = len(r["states"]) == self.scenario.num_states

    # ----- the loop --------------------------------------------------------------------------
    def execute(self, resume: bool = False, until_state: int | None = None) -> dict[str, Any]:
        """Run (or continue) the states; ``until_state`` stops after that state (for tests)."""
        start = self._restore() if resume else self._start_fresh()
        last = self.scenario.num_states - 1 if until_state is None else min(until_state, self.scenario.num_states - 1)
        for b in range(start, last + 1):
            self._run_state(b)
        return self.results

    def _start_fresh(self) -> int:
        self.layout.root.mkdir(parents=True, exist_ok=True)
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
        self._save_state(ctx)
        old = f", old {entry['top1_old']:.1f}" if entry["top1_old"] is not None else ""
        log(f"[{name}] state {b + 1}: top-1 {entry['top1']:.2f}{old}, new {entry['top1_new']:.1f} ({entry['time_s']:.1f} s)")

    def _train(self, ctx: Context) -> dict[str, Any]:
        b = ctx.state.index
        rounds = self.method.rounds(ctx)
        cache = self._state0_cache_path() if b == 0 and rounds == 1 else None
        if cache is not None and cache.is_file():
            cached = io.load_torch(cache)
            self.model.load_state_dict(cached["model"])
            log(f"[{self.config.method}] state 1: reusing the cached state-0 model {cache} "
                "(same data, order, backbone, head, training settings and seed)")
            indices = self._train_set(ctx)
            return {"train_images": int(indices.numel()), **json.loads(cached["fit"]), "state0_cached": True}
        info: dict[str, Any] = {}
        seconds = 0.0
        for r in range(rounds):
            ctx.round = r
            info.update(self._fit_round(ctx, f"state {b + 1}" + (f" round {r + 1}" if rounds > 1 else "")))
            seconds += info["train_seconds"]
        info["train_seconds"] = seconds
        if cache is not None:
            io.write_torch(cache, {"model": self.model.state_dict(), "fit": json.dumps(
                {k: info[k] for k in ("train_seconds", "images_per_second", "final_loss")})})
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
        return {
            "train_images": int(indices.numel()),
            "train_seconds": fit["train_seconds"],
            "images_per_second": fit["images_per_second"],
            "final_loss": fit["epoch_losses"][-1] if fit["epoch_losses"] else None,
        }

    def _update_memory(self, ctx: Context) -> None:
        st = ctx.state
        candidates = self.method.memory_candidates(ctx)
        assert ctx.trained is not None
        ctx.trained.new_images = candidates
        pos = self.scenario.train_pos[candidates]
        new = {c: candidates[pos == c] for c in st.new}
        self.memory.update(
            st.n_seen, new, lambda idx: self.engine.train_features(self.model, idx), ctx.generator
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
        arrays = {"logits": out["logits"].numpy(), "labels": labels.numpy(), "scores": scores.numpy()}
        arrays.update({f"scores_{k}": v.numpy() for k, v in extras.items()})
        io.write_npz(self.layout.scores(st.index), **arrays)
        return entry

    def _statistics(self, ctx: Context) -> Stats:
        """The state's class statistics (:mod:`cilkit.statistics`) from what it trained on,
        written to ``stats/state_XX.json``; kept as the history of the next state."""
        assert ctx.trained is not None
        stats = state_statistics(ctx, ctx.trained, self.statistics)
        io.write_json(self.layout.stats(ctx.state.index), stats)
        if stats["nonpositive_cur_mean"]:
            classes = ", ".join(str(self.scenario.order[c]) for c in stats["nonpositive_cur_mean"])
            log(f"[{self.config.method}] warning: state {ctx.state.index + 1}: old class(es) {classes} have a "
                "mean score <= 0 on their exemplars; IL2M's rectification flips the sign of their scores "
                "(il2m.guard_nonpositive: true leaves them unrectified)")
        self.statistics = stats
        return stats

    # ----- files -----------------------------------------------------------------------------
    def _save_state(self, ctx: Context) -> None:
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
        ckpts = self.layout.checkpoints()
        if not ckpts:
            io.write_yaml(self.layout.config, self.config.to_dict())
            log(f"[{self.config.method}] no checkpoint in {self.layout.root}: starting from state 1")
            return 0
        path = ckpts[-1][1]
        try:
            ckpt = io.load_torch(path)
        except Exception as e:  # a corrupt or foreign file
            raise UserError(f"checkpoint '{path}' cannot be read: {e.__class__.__name__}") from None
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
        b = int(ckpt["state"])
        self.statistics = (json.loads(ckpt["statistics"]) if "statistics" in ckpt
                           else read_stats(self.layout.stats(b), b))  # checkpoints of cilkit <= 0.1.0
        log(f"[{self.config.method}] resuming {self.layout.root} after state {b + 1}/{self.scenario.num_states}")
        return b + 1

    def _state0_cache_path(self) -> Path | None:
        if self.config.state0_cache is None:
            return None
        c = self.config
        root = Path(os.path.expanduser(self.config.state0_cache))
        key = {
            "data": c.data.model_dump(mode="json"),
            "augment": repr(self.dataset.augment),
            "order": self.scenario.order[: self.scenario.ends[0]],
            "val_per_class": c.scenario.val_per_class,
            **({"imbalance": self.scenario.imbalance} if c.scenario.imbalance.profile != "none" else {}),
            "model": c.model.model_dump(mode="json"),
            "method": self.method.state0_signature(),
            "train": {
                "epochs": c.train.epochs_of(0),
                "lr": c.train.lr_of(0),
                "batch_size": c.train.batch_size,
                "momentum": c.train.momentum,
                "weight_decay": c.train.weight_decay,
                "schedule": c.train.schedule.model_dump(mode="json"),
            },
            "seed": c.seed,
            "amp": c.amp,
            "channels_last": c.channels_last,
            "device": self.device.type,
            "torch": torch.__version__,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return root / f"{self.dataset.name}-{digest}.pt"


def run_methods(
    config: RunConfig, out_dir: str | os.PathLike, resume: bool = False, progress: bool | None = None
) -> dict[str, dict[str, Any]]:
    """Run every method of ``config`` on the same protocol; one sub-directory per method when
    there are several. Returns ``{method: results}``. With ``runs: R > 1`` see
    :func:`repeat_runs`."""
    out = Path(out_dir)
    if config.runs > 1:
        return repeat_runs(config, out, resume, progress)
    if isinstance(config.method, str):
        return {config.method: Run(config, out, progress).execute(resume=resume)}
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        io.write_yaml(RunLayout(out).config, config.to_dict())
    results = {}
    dataset = load_dataset(config.data)  # read once, shared by every method
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
                "mean_incremental_balanced_top1", "mean_incremental_balanced_top1_excl_first")


def _mean_std(values: list[float | None]) -> dict[str, Any]:
    known = [v for v in values if v is not None]
    arr = np.array(known, dtype=np.float64)
    return {"mean": float(arr.mean()) if known else None, "std": float(arr.std()) if known else None,
            "values": values}


def repeat_runs(
    config: RunConfig, out: Path, resume: bool = False, progress: bool | None = None
) -> dict[str, dict[str, Any]]:
    """Each method ``runs`` times with seeds ``seed, seed+1, ...`` (into :func:`repeat_dirs`),
    then ``<out>/summary.json``: per method, mean and std (population std, numpy's default, as
    the active-IL code reports it) over the runs of the mean incremental top-1 and balanced
    top-1, with and without state 0. Returns ``{"<method>/run_<k>": results}``."""
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        io.write_yaml(RunLayout(out).config, config.to_dict())
    dataset = load_dataset(config.data)
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
        summary["methods"][name] = {key: _mean_std([r[key] for r in runs]) for key in SUMMARY_KEYS}
        m = summary["methods"][name]["mean_incremental_top1_excl_first"]
        if m["mean"] is not None:
            log(f"[{name}] {config.runs} runs: mean incremental top-1 (excl. state 1) {m['mean']:.2f} +- {m['std']:.2f}")
    io.write_json(RunLayout(out).summary, summary)
    return results
