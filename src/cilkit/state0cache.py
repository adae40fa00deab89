"""The state-0 model cache: the first state's trained model, reused by later runs that would
train exactly the same model.

A protocol's first state is often most of a run's cost (LUCIR's 50-class CIFAR-100 base, for
instance) and is the same for every method that trains it the same way, so a comparison
trains it once. Reuse is only safe when everything that shapes the model is equal, so the
key holds: the data's *content* (a digest of the state's images and labels, not the config's
path to them), the class order and hold-outs, the model's architecture (parameter names and
shapes, module classes), the *code* of every method hook that runs in state 0 (so a subclass
with another loss never gets the parent's model), the method's declared options
(:meth:`Method.state0_signature`), the pretrained backbone weights file if any (its path, size
and modification time), the source of the run's plugins, the training settings, seed,
precision, device and the cilkit/torch versions. A cache hit and a cold run then give the same numbers (the run's
later random draws have their own generators: see :mod:`cilkit.seeding`).

An unreadable entry (truncated, garbage, foreign) is a miss with one warning naming the file;
an unwritable cache directory is a warning: the cache never ends a run.
"""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path
from typing import Any, Callable

import torch

import cilkit
from cilkit import io
from cilkit.errors import UserError, described

STATE0_HOOKS = ("build_model", "before_state", "rounds", "train_set", "param_groups", "loss")
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
    """Every option of the method but those it declares unread in state 0
    (``state0_free_options``), what else it declares (:meth:`Method.state0_signature`), and the
    code of its state-0 hooks. A new method is safe without declaring anything: at worst it
    misses a cache entry it could have shared."""
    free = set(getattr(method, "state0_free_options", ()))
    return {
        "options": {k: v for k, v in method.cfg.model_dump(mode="json").items() if k not in free},
        "declared": method.state0_signature(),
        "hooks": {name: code_digest(getattr(method, name)) for name in STATE0_HOOKS},
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


def cache_file(root: Path, dataset_name: str, key: dict[str, Any]) -> Path:
    key = {**key, "cilkit": cilkit.__version__, "torch": torch.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return root / f"{dataset_name}-{digest}.pt"


def load_entry(path: Path, model: torch.nn.Module, warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The cached fit facts after loading the cached weights into ``model``; None on a miss.
    An entry that cannot be used is a miss with one warning (and ``model`` is left as it was)."""
    if not path.is_file():
        return None
    try:
        entry = io.load_torch(path)
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


def store_entry(path: Path, model: torch.nn.Module, fit: dict[str, Any], warn: Callable[[str], None]) -> None:
    """Write the entry atomically; a failure (read-only or full disk) is a warning."""
    try:
        io.write_torch(path, {"model": model.state_dict(), "fit": json.dumps({k: fit[k] for k in FIT_KEYS})})
    except UserError as e:
        warn(f"warning: the state-0 cache was not written ({e}); the run goes on")
