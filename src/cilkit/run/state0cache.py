"""The state-0 model cache: the first state's trained model, reused by later runs that would
train exactly the same model.

A protocol's first state is often most of a run's cost (LUCIR's 50-class CIFAR-100 base, for
instance) and is the same for every method that trains it the same way, so a comparison
trains it once. Reuse is only safe when everything that shapes the model is equal, so the key
(:func:`state0_key`) holds:

- every config value that :mod:`cilkit.settings.keys` marks as read in state 0 (training, model, data
  and execution settings: device, threads, precision, channels-last, compile; the seed);
- values derived from the rest: the data's *content* (a digest of the state's images and labels,
  not the config's path to them), the class order of state 0, the hold-outs, the normalisation,
  the epochs and learning rate of state 0, the resolved device and thread count;
- the model's architecture (parameter names and shapes, module classes), the pretrained
  backbone weights file if any (its path, size and modification time);
- the method's options but those it declares unread in state 0 and what else it declares
  (:meth:`Method.state0_signature`), and the *code* (:func:`code_version`): a digest of every
  source file of the installed cilkit package and of the run's plugins (a plugin's package, or
  the modules its file imported from beside it: :mod:`cilkit.settings.plugins`), and of the
  method's state-0 hooks (so a subclass defined anywhere with another loss never gets the
  parent's model);
- the cilkit and torch versions.

The entry stores its full key and is used only when the key it holds is the one asked for (a
renamed or copied file is a miss with one warning). A cache hit and a cold run then give the
same numbers (the run's later random draws have their own generators: see :mod:`cilkit.common.seeding`).
An unreadable entry (truncated, garbage, foreign) is a miss with one warning naming the file;
an unwritable cache directory is a warning: the cache never ends a run.

Runs in parallel (``--jobs``, cluster jobs on a shared file system) that need the same entry
take turns (:func:`entry_lock`, an ``flock`` on ``<entry>.lock``, removed with the lock:
:mod:`cilkit.common.locks`): the first trains state 0 and writes the entry, the others wait for it,
then load it, so it is never trained twice at once and never read half-written (entries are
also written atomically).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

import cilkit
from cilkit.common import distributed, io, locks
from cilkit.settings import plugins
from cilkit.settings.config import RunConfig
from cilkit.common.errors import UserError, described
from cilkit.settings.keys import state0_settings
from cilkit.settings.options import state0_free

if TYPE_CHECKING:
    from cilkit.data.base import Dataset
    from cilkit.methods.base import Method
    from cilkit.cil.scenario import Scenario

STATE0_HOOKS = ("build_model", "before_state", "rounds", "begin_round", "train_set", "param_groups", "loss",
                "train_mode", "begin_epoch", "end_epoch", "batch_order", "mix_inputs", "before_step", "after_step")
# ^ the Method hooks that run while state 0 trains (after it: memory, statistics, scores,
#   which the cache does not skip)
FIT_KEYS = ("train_seconds", "images_per_second", "first_loss", "final_loss")


def code_digest(fn: Callable[..., Any]) -> str:
    """Where ``fn`` is defined and a digest of its bytecode and constants (nested functions
    included): changes when the function is edited or replaced by an override."""
    func = getattr(fn, "__func__", fn)
    h = hashlib.sha256(f"{func.__module__}.{func.__qualname__}".encode())
    _hash_code(h, func.__code__)
    return h.hexdigest()[:16]


def _hash_code(h: Any, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(h, const)
        else:
            h.update(repr(const).encode())


def method_signature(method: Any) -> dict[str, Any]:
    """Every option of the method but those its config declares unread in state 0
    (``option(..., state0=False)``, :func:`cilkit.settings.options.state0_free`), what else it declares (:meth:`Method.state0_signature`), and the
    code of its state-0 hooks. A new method is safe without declaring anything: at worst it
    misses a cache entry it could have shared. A method that trains state 0 as another does
    (``state0_like``) has that method's signature under the same config."""
    like = method.state0_like()
    if like is not None:
        return method_signature(like(method.run_config))
    free = state0_free(type(method.cfg))
    return {
        "options": {k: v for k, v in method.cfg.model_dump(mode="json").items() if k not in free},
        "declared": method.state0_signature(),
        "hooks": {name: code_digest(getattr(method, name)) for name in STATE0_HOOKS},
    }


@functools.cache
def package_digest() -> str:
    """A digest of every source file of the installed cilkit package (computed once per
    process): any edit of the engine, a transform, a backbone, a reader or a helper is a miss."""
    root = Path(cilkit.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def code_version(plugin_specs: list[str]) -> dict[str, Any]:
    """The code a run runs: a digest of the cilkit package (:func:`package_digest`) and of each
    of its plugins (:func:`cilkit.settings.plugins.source_digest`: a plugin's package or the
    modules beside it included). The state-0 cache is keyed on it, and every checkpoint records
    it (:mod:`cilkit.run.store`: a resume under other code is said, or refused)."""
    return {"cilkit": package_digest(), **({"plugins": plugins.source_digest(plugin_specs)} if plugin_specs else {})}


def code_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two :func:`code_version` records, in words: ``the cilkit package``,
    ``plugin '/path/x.py'``."""
    changed = ["the cilkit package"] if before.get("cilkit") != now.get("cilkit") else []
    old, new = before.get("plugins", {}), now.get("plugins", {})
    return changed + [f"plugin '{spec}'" for spec in dict.fromkeys([*old, *new]) if old.get(spec) != new.get(spec)]


def state0_key(config: RunConfig, dataset: "Dataset", scenario: "Scenario", model: torch.nn.Module,
               method: "Method", mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Everything that shapes the state-0 model (see the module's docstring)."""
    first = torch.tensor(scenario.order[: scenario.ends[0]])
    state0_images = torch.nonzero(torch.isin(dataset.train.labels, first)).flatten()
    c = config
    return {
        "settings": state0_settings(c.to_dict(), str(c.method)),
        "data": dataset.train.content_digest(state0_images),
        "augment": repr(dataset.augment),
        "normalisation": [mean.tolist(), std.tolist()],
        "order": scenario.order[: scenario.ends[0]],
        **({"imbalance": scenario.imbalance} if c.scenario.imbalance.profile != "none" else {}),
        "epochs": c.train.epochs_of(0),
        "lr": c.train.lr_of(0),
        "model": {**model_signature(model),
                  **({"weights_file": file_stamp(c.model.weights)} if c.model.weights else {})},
        "code": code_version(c.plugins),
        "method": method_signature(method),
        "device": device.type,
        "threads": torch.get_num_threads(),
        # data-parallel training: each rank's slice, its BatchNorm statistics
        **({"ranks": distributed.world_size()} if distributed.active() else {}),
    }


def model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter and buffer names with shapes, and the classes of every module."""
    return {
        "tensors": [[k, list(v.shape)] for k, v in model.state_dict().items()],
        "modules": sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()}),
    }


def file_stamp(path: str) -> list[Any]:
    """A file's path, size and modification time (ns): a rewritten file changes the key."""
    st = Path(path).stat()
    return [str(path), st.st_size, st.st_mtime_ns]


@dataclass(frozen=True)
class CacheEntry:
    """A cache file and the full key (JSON) its entry must hold to be used."""

    path: Path
    key: str

    def __str__(self) -> str:
        return str(self.path)


def cache_file(root: str | os.PathLike, dataset_name: str, key: dict[str, Any]) -> CacheEntry:
    """The entry of ``key`` under the cache directory ``root`` (``~`` expanded)."""
    text = json.dumps({**key, "cilkit": cilkit.__version__, "torch": torch.__version__}, sort_keys=True, default=str)
    name = f"{dataset_name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"
    return CacheEntry(Path(os.path.expanduser(root)) / name, text)


@contextlib.contextmanager
def entry_lock(cache: CacheEntry | None, warn: Callable[[str], None]) -> Iterator[None]:
    """Hold the entry's lock (``<entry>.lock`` beside it) for the block: the state-0 training
    or loading of a run that another run may be doing at the same time. Waits, with one line,
    while another run holds it; no lock (and no wait) when the cache directory is not writable."""
    if cache is None:
        yield
        return
    lock_path = cache.path.with_name(cache.path.name + ".lock")
    waiting = f"another run is training the state-0 model of cache entry {cache.path.name}: waiting for it"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = locks.acquire(lock_path, on_wait=lambda: warn(waiting))
    except OSError:
        yield  # store_entry will say the cache is not writable
        return
    try:
        yield
    finally:
        locks.release(f, lock_path)  # the lock file goes with the lock


def load_entry(cache: CacheEntry, model: torch.nn.Module, warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The cached fit facts after loading the cached weights into ``model``; None on a miss.
    An entry that cannot be used, or that holds another key than asked for, is a miss with one
    warning (and ``model`` is left as it was)."""
    path = cache.path
    if not path.is_file():
        return None
    try:
        entry = io.load_torch(path)
        if entry.get("key") != cache.key:
            raise ValueError("it holds another key: a renamed or copied entry")
        fit = json.loads(entry["fit"])
        state = entry["model"]
        missing = [k for k in FIT_KEYS if k not in fit]
        if missing:
            raise KeyError(missing[0])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            model.load_state_dict(state)
        except Exception:
            model.load_state_dict(before)
            raise
    except Exception as e:  # truncated, garbage, foreign or mismatched: retrain instead
        warn(f"warning: state-0 cache entry '{path}' cannot be used ({described(e, 160)}); training state 1 instead")
        return None
    return {k: fit[k] for k in FIT_KEYS}


def store_entry(cache: CacheEntry, model: torch.nn.Module, fit: dict[str, Any], warn: Callable[[str], None]) -> None:
    """Write the entry, with its key, atomically; a failure (read-only or full disk) is a warning."""
    try:
        io.write_torch(cache.path, {"model": model.state_dict(), "fit": json.dumps({k: fit[k] for k in FIT_KEYS}),
                                    "key": cache.key})
    except UserError as e:
        warn(f"warning: the state-0 cache was not written ({e}); the run goes on")
