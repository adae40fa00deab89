"""What the command line and a comparison change in a config: ``--set`` overrides, a method's
own protocol keys, and the memory a method is defined with.

- ``--set key=value`` (:func:`apply_overrides`; values read as YAML), ``--set method:key=value``
  for one method's runs alone;
- ``methods:`` in a config (``--set lwf:memory.total=0`` on the command line) gives a method
  protocol keys of its own (:func:`per_method_overrides`, checked: a registered method, declared
  protocol keys only); :meth:`cilkit.settings.config.RunConfig.for_method` applies them, so each
  planned run's config holds them resolved (a protocol of its own in the report);
- a method declares whether it is defined with a memory (``needs_memory`` on its class:
  True needs one, False keeps none, None either): :func:`memory_refusal` is the one line of a
  config that contradicts it, :func:`method_label` the name a run of a memory-free method that
  was allowed a memory (``allow_memory``) goes by (``lwf (with memory 200)``).

Imports of cilkit: ``common``, ``settings.keys``, ``settings.registry``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from cilkit.common.errors import UserError, did_you_mean, first_error, unknown_name
from cilkit.settings import keys
from cilkit.settings.registry import METHODS


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"memory.total=500"`` -> (["memory", "total"], 500); a method's own protocol key,
    ``"lwf:memory.total=0"`` -> (["methods", "lwf", "memory", "total"], 0). Values are parsed as YAML."""
    if "=" not in item:
        raise UserError(f"--set '{item}': expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    method, colon, key = key.rpartition(":")
    if not key or any(not part for part in key.split(".")) or (colon and not method.strip()):
        raise UserError(f"--set '{item}': empty key")
    prefix = ["methods", method.strip()] if colon else []
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return prefix + key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set '{item}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def overrides_of(value: Any) -> dict[str, dict[str, Any]]:
    """A config's ``methods`` checked (:func:`per_method_overrides`) and nested."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("config key 'methods': expected a mapping of method names to the protocol keys they "
                         "change (methods: {lwf: {memory: {total: 0}}})")
    return {name: per_method_overrides(name, v) for name, v in value.items()}


def resolved(data: dict[str, Any], name: str) -> dict[str, Any]:
    """A config's mapping (``to_dict``) with method ``name``'s overrides applied and no
    ``methods`` left: the config of that method's runs."""
    data = copy.deepcopy(data)
    for dotted, value in keys.flatten((data.pop("methods", None) or {}).get(name) or {}).items():
        set_dotted(data, dotted.split("."), value)
    return data


def check_methods(config: Any, kinds: dict[str, str]) -> None:
    """Raise ``ValueError`` (one line) unless every method of ``config`` (a ``RunConfig``) is a
    valid config with its overrides applied (``for_method``) and runs with a memory only as it
    declares (:func:`memory_refusal`). ``kinds``: what a key's values are called, in errors."""
    several = len(config.method_names) > 1
    for name in config.method_names:
        if name in config.methods:
            try:
                config.validated_for(name)  # its own config is checked, memory included
            except ValidationError as e:
                raise ValueError(first_error(e, prefix=f"methods.{name}", model=type(config), kinds=kinds)) from None
            continue
        refusal = memory_refusal(name, config.memory.model_dump(), config.method_options(name), several)
        if refusal:
            raise ValueError(refusal)


def per_method_overrides(name: Any, value: Any) -> dict[str, Any]:
    """The entry ``methods.<name>``, checked (a registered method; a mapping of declared protocol
    keys, nested or dotted) and nested."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"config key 'methods.{name}': {unknown_name('method', str(name), METHODS, plugin=True)}")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"config key 'methods.{name}': expected a mapping of protocol keys (memory: {{total: 0}})")
    nested: dict[str, Any] = {}
    for dotted, v in keys.flatten(_nested(value)).items():
        found = keys.declared(dotted)
        if found is None and dotted.split(".")[0] in METHODS:
            raise ValueError(f"config key 'methods.{name}.{dotted}': only protocol keys may differ between the methods "
                             f"of one run; '{dotted}' is a method's option, that method's alone already")
        if found is None:
            protocol = [k for k, d in keys.KEYS.items() if d.role is keys.Role.PROTOCOL and k != "methods"]
            hint = did_you_mean(dotted, protocol, prefix=f"methods.{name}.")
            raise ValueError(f"unknown key 'methods.{name}.{dotted}'" + (f": {hint}" if hint else ""))
        if found.role is not keys.Role.PROTOCOL or dotted == "methods":
            raise ValueError(f"config key 'methods.{name}.{dotted}': only protocol keys (data, scenario, memory, "
                             f"model, train, amp) may differ between the methods of one run; '{dotted}' is not one")
        set_dotted(nested, dotted.split("."), v)
    return nested


def _nested(value: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping whose keys may be dotted (``memory.total``), nested."""
    out: dict[str, Any] = {}
    for k, v in value.items():
        set_dotted(out, str(k).split("."), _nested(v) if isinstance(v, dict) else v)
    return out


def set_dotted(data: dict[str, Any], path: list[str], value: Any) -> None:
    """``data[path[0]][path[1]]... = value``; a mapping value is merged into one already there."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
        for k, v in value.items():
            set_dotted(node[path[-1]], [k], v)
    else:
        node[path[-1]] = copy.deepcopy(value)


def _memory_text(memory: Mapping[str, Any]) -> tuple[str, str] | None:
    """``("memory.total", "200")`` for the budget a memory config sets, None for no memory."""
    if memory.get("total"):
        return "memory.total", str(memory["total"])
    if memory.get("per_class"):
        return "memory.per_class", f"{memory['per_class']} per class"
    if memory.get("budget_bytes"):  # shared with the model (cilkit.run.accounting)
        return "memory.budget_bytes", f"{memory['budget_bytes']} bytes"
    return None


def memory_refusal(name: str, memory: Mapping[str, Any], options: Mapping[str, Any], several: bool) -> str | None:
    """Why method ``name`` may not run with ``memory`` (the config's ``memory``; its class's ``needs_memory``: False keeps
    none, True needs one), in one line; None when it may. A method that keeps none runs with a
    memory only when its options set ``allow_memory`` (then :func:`method_label` says so).
    ``several``: the method is one of a comparison's (the line names the per-method override)."""
    needs = getattr(METHODS.get(name), "needs_memory", None)
    budget = _memory_text(memory)
    if needs is False and budget is not None and not options.get("allow_memory"):
        key, size = budget
        none = "null" if key == "memory.budget_bytes" else "0"  # a budget shared with the model is > 0
        how = (f"give it none with --set {name}:{key}={none} (memory-free and memory methods are two protocols: the "
               "report shows each with its own table)" if several else
               f"run it with --set {key}={none} (a comparison with methods that keep a memory is two protocols: "
               f"--methods A,{name} --set {name}:{key}={none} runs both, each with its own table)")
        return (f"method '{name}' keeps no memory but {key} is {memory.get(key.split('.')[1])}: {how}, or "
                f"--set {name}.allow_memory=true to train it on the memory, labelled '{name} (with memory {size})'")
    if needs is True and budget is None:
        return f"method '{name}' needs a memory: set memory.total (or memory.per_class) above 0"
    return None


def method_label(name: str, config: Mapping[str, Any] | None) -> str:
    """A method's name as tables, figures and log lines show it for a run of ``config`` (a
    config.yaml's mapping): ``lwf (with memory 200)`` for a method that keeps no memory by
    design (``needs_memory`` False) run with one (``allow_memory``), else the name."""
    if getattr(METHODS.get(name), "needs_memory", None) is not False or not isinstance(config, Mapping):
        return name
    memory = config.get("memory")
    budget = _memory_text(memory) if isinstance(memory, Mapping) else None
    return name if budget is None else f"{name} (with memory {budget[1]})"
