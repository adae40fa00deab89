"""What shapes the numbers: one declaration, for every config key, of what it does to a run.

Three consumers derive their rules from :data:`KEYS` and nothing else:

- ``cilkit compare`` groups runs by their :attr:`Role.PROTOCOL` keys (:func:`protocol_settings`);
- ``--resume`` (and ``cilkit tune`` reusing a point) refuses a config that differs from the one
  a run was made with in any key whose ``resume`` is ``"keep"`` and warns for ``"warn"``
  (:func:`config_differences`, :func:`resume_warnings`);
- the state-0 cache keys on every key marked ``state0`` (:func:`state0_settings`), beside the
  values it derives itself (the data's content, the class order of state 0, the model's
  shapes, the code; see :mod:`cilkit.run.state0cache`).

A method's own options (the top-level key named after it) are declared on their fields, with
:func:`cilkit.settings.options.option` (by default :attr:`Role.IDENTITY`, read in state 0, kept on
resume); :func:`option_key` reads that declaration. A key of :class:`~cilkit.settings.config.RunConfig`
missing here is a test failure (``tests/test_keys.py``, with :func:`undeclared_keys`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from cilkit.settings.options import Resume, declaration


class Role(enum.Enum):
    PROTOCOL = "protocol"  # what the experiment is: runs of one protocol are compared
    IDENTITY = "identity"  # which run of a protocol: the seed, the method and its options
    EXECUTION = "execution"  # how it ran: can move the last digits, is no part of the protocol
    NONE = "none"  # changes no number


@dataclass(frozen=True)
class Key:
    role: Role
    state0: bool  # read while state 0 trains: part of the state-0 cache key
    resume: Resume  # keep: a resume must not change it; warn: may, with a warning; free: may

    @property
    def shapes_numbers(self) -> bool:
        return self.role is not Role.NONE


def _protocol(state0: bool = True) -> Key:
    return Key(Role.PROTOCOL, state0, "keep")


def _execution(state0: bool = True, resume: Resume = "keep") -> Key:
    return Key(Role.EXECUTION, state0, resume)


NO_NUMBER = Key(Role.NONE, False, "free")
DERIVED = _protocol(state0=False)
# ^ a protocol key whose effect on state 0 the cache key holds as a derived value instead (the
#   data's content digest for paths, the class order of state 0 for the scenario's shape, the
#   epochs and learning rate of state 0 for the schedule's two values)
METHOD_OPTIONS = Key(Role.IDENTITY, True, "keep")  # an option no method's config declares (safe)

KEYS: dict[str, Key] = {
    "name": NO_NUMBER,
    "paper": NO_NUMBER,  # the paper's reported figure, shown beside the run's (cilkit.settings.paper)
    "plugins": NO_NUMBER,  # where the files are; their source is keyed by digest
    "seed": Key(Role.IDENTITY, True, "keep"),
    "runs": Key(Role.NONE, False, "keep"),  # how many seeds a parent holds: changes which runs exist
    "method": Key(Role.IDENTITY, False, "keep"),  # state 0: the method's code and options are keyed
    # per-method overrides of protocol keys: a comparison's parent only (a run's config holds them
    # resolved, RunConfig.for_method, where the keys they set are grouped, kept and keyed)
    "methods": _protocol(state0=False),
    # data
    "data.name": _protocol(),
    "data.root": DERIVED,
    "data.train_list": DERIVED,
    "data.test_list": DERIVED,
    "data.image_size": _protocol(),
    "data.resize": _protocol(state0=False),  # evaluation only
    "data.channels": _protocol(),
    "data.check": _protocol(),  # quick: channels and size decided from a sample
    "data.in_memory": _protocol(),
    "data.workers": NO_NUMBER,
    "data.test_fraction": _protocol(),
    "data.synthetic.num_classes": _protocol(),
    "data.synthetic.train_per_class": _protocol(),
    "data.synthetic.test_per_class": _protocol(),
    "data.synthetic.size": _protocol(),
    "data.synthetic.channels": _protocol(),
    "data.mean": _protocol(),
    "data.std": _protocol(),
    "data.crop_pad": _protocol(),
    "data.flip": _protocol(),
    "data.options": _protocol(),
    # scenario
    "scenario.order": DERIVED,
    "scenario.initial": DERIVED,
    "scenario.increment": DERIVED,
    "scenario.states": DERIVED,
    "scenario.val_per_class": _protocol(),
    "scenario.imbalance.profile": _protocol(),
    "scenario.imbalance.ratio": _protocol(),
    "scenario.imbalance.minority_fraction": _protocol(),
    "scenario.imbalance.counts": _protocol(),
    "scenario.imbalance.ordering": _protocol(),
    "scenario.imbalance.keep": _protocol(),
    "scenario.imbalance.shots.many": _protocol(),
    "scenario.imbalance.shots.few": _protocol(),
    "scenario.imbalance.seed": _protocol(),
    "scenario.imbalance.apply_to_test": _protocol(),
    # memory: filled after state 0 trains (a method that reads it in state 0 declares so)
    "memory.total": _protocol(state0=False),
    "memory.per_class": _protocol(state0=False),
    # the model counted against the memory (memory-aligned): never compared with exemplars alone
    "memory.budget_bytes": _protocol(state0=False),
    "memory.selection": _protocol(state0=False),
    # model
    "model.backbone": _protocol(),
    "model.width": _protocol(),
    "model.weights": _protocol(),  # and the file's stamp
    # train
    "train.epochs": DERIVED,
    "train.epochs_first": DERIVED,
    "train.batch_size": _protocol(),
    "train.lr": DERIVED,
    "train.lr_first": DERIVED,
    "train.optimizer": _protocol(),
    "train.momentum": _protocol(),
    "train.weight_decay": _protocol(),
    "train.clip_grad_norm": _protocol(),
    "train.schedule.type": _protocol(),
    "train.schedule.milestones": _protocol(),
    "train.schedule.gamma": _protocol(),
    "train.schedule.patience": _protocol(),
    "train.schedule.period": _protocol(),
    "train.schedule.period_mult": _protocol(),
    "train.schedule.min_lr": _protocol(),
    "train.schedule.warmup_epochs": _protocol(),
    "train.schedule.warmup_factor": _protocol(),
    "train.eval_batch_size": _protocol(state0=False),
    "train.sync_bn": _protocol(),
    "log.tensorboard": NO_NUMBER,  # a resume rebuilds the finished states' events from history.jsonl
    "log.wandb": NO_NUMBER,  # a resume continues the same wandb run (its id is kept in <run>/wandb/)
    "log.wandb_project": NO_NUMBER,
    "log.wandb_mode": NO_NUMBER,
    # execution
    "device": _execution(),
    "threads": _execution(resume="warn"),
    "amp": _protocol(),  # bf16 moves more than the last digits
    "channels_last": _execution(),
    "compile": _execution(resume="warn"),
    "dist_timeout_s": NO_NUMBER,
    "state0_cache": NO_NUMBER,
    "keep_checkpoints": NO_NUMBER,
}


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """The dotted leaf keys of a config model (sub-models expanded; a dict field is a leaf)."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += leaf_keys(sub, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


UNDECLARED = Key(Role.PROTOCOL, True, "keep")  # safe by default: refused on resume, a cache miss


def undeclared_keys(model: type[BaseModel]) -> list[str]:
    """The leaf keys of a config model (:func:`leaf_keys`) that :data:`KEYS` does not declare."""
    return [k for k in leaf_keys(model) if k not in KEYS]


def stale_keys(model: type[BaseModel]) -> list[str]:
    """The keys :data:`KEYS` declares that are no leaf key of the config model."""
    leaves = set(leaf_keys(model))
    return [k for k in KEYS if k not in leaves]


def option_key(dotted: str) -> Key:
    """The declaration of a method's option ``<method>.<option>``, from its config field
    (:func:`cilkit.settings.options.option`); :data:`METHOD_OPTIONS` for a method not registered or an
    option its config does not name."""
    from cilkit.settings.registry import METHODS

    method, _, name = dotted.partition(".")
    cls = METHODS.get(method)
    field = cls.Config.model_fields.get(name.split(".")[0]) if cls is not None else None
    if field is None:
        return METHOD_OPTIONS
    found = declaration(field)
    return Key(Role(found.role), found.state0, found.resume)


def declared(dotted: str) -> Key | None:
    """The declaration of a dotted config key: its own or its nearest declared parent's (a dict
    field such as ``data.options``); None for a key :data:`KEYS` does not name."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        found = KEYS.get(".".join(parts[:n]))
        if found is not None:
            return found
    return None


def key_of(dotted: str, methods: frozenset[str] | set[str] = frozenset()) -> Key:
    """:func:`declared`, else a method's option (a top-level key in ``methods``: :func:`option_key`),
    else :data:`UNDECLARED`."""
    found = declared(dotted)
    if found is not None:
        return found
    return option_key(dotted) if dotted.split(".")[0] in methods else UNDECLARED


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of a nested config dict. A declared key (``data.options``) is a leaf."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and dotted not in KEYS:
            out.update(flatten(v, f"{dotted}."))
        else:
            out[dotted] = v
    return out


def _methods_in(*configs: Mapping[str, Any]) -> set[str]:
    from cilkit.settings.registry import METHODS

    return {k for c in configs for k in c if k in METHODS}


def config_differences(now: Mapping[str, Any], then: Mapping[str, Any]) -> list[str]:
    """The dotted keys in which two configs differ that a resumed run must keep."""
    return _differing(now, then, "keep")


def resume_warnings(now: Mapping[str, Any], then: Mapping[str, Any]) -> list[str]:
    """The dotted keys that differ and that a resume may change with a warning (``threads``)."""
    return _differing(now, then, "warn")


def _differing(now: Mapping[str, Any], then: Mapping[str, Any], resume: Resume) -> list[str]:
    a, b = flatten(now), flatten(then)
    methods = _methods_in(now, then)
    return sorted(k for k in a.keys() | b.keys() if key_of(k, methods).resume == resume and a.get(k) != b.get(k))


def protocol_settings(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The config's protocol keys (dotted), with ``defaults`` for keys an older cilkit did not
    write (a run recorded before a key existed ran as its default)."""
    given, base = flatten(config), flatten(defaults)
    methods = _methods_in(config, defaults)
    return {k: given.get(k, base.get(k)) for k in sorted(given.keys() | base.keys())
            if (key := declared(k) or (option_key(k) if k.split(".")[0] in methods else None)) is not None
            and key.role is Role.PROTOCOL}


def state0_settings(config: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The config values the state-0 cache keys on: every key marked ``state0`` but the
    methods' options (the run's method gives its own, but those declared ``state0=False``:
    :func:`cilkit.run.state0cache.method_signature`)."""
    methods = _methods_in(config) | {method}
    return {k: v for k, v in flatten(config).items() if k.split(".")[0] not in methods and key_of(k, methods).state0}
