"""Plugins: a user's own methods, backbones and data readers, imported before a config is read.

A plugin is a Python file (``my_method.py``; a relative path is resolved against the config
file's folder for the ``plugins:`` key, against the working directory for ``--plugin``) or an
importable module name (``mypackage.cil``). Importing it runs its ``register_method`` /
``register_backbone`` / ``register_source`` decorators (:mod:`cilkit.settings.registry`), so the
config's names are checked against registries that hold it. Each plugin is imported once per
process; a run records its plugins as absolute paths in config.yaml, so ``--resume`` imports
them again. A missing file, a failed import or a plugin that raises is one ``UserError`` line
naming the plugin and the cause.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from cilkit.common.errors import UserError, described


def is_file(spec: str) -> bool:
    """Whether ``spec`` names a file (ends in .py or holds a path separator), else a module."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def resolve(spec: str, base: Path) -> str:
    """A file plugin as an absolute path (relative ones from ``base``); a module name as is."""
    if not is_file(spec):
        return spec
    return os.path.abspath(base / os.path.expanduser(spec))


def plugin_list(value: Any, base: Path, key: str = "plugins") -> list[str]:
    """``value`` (the ``plugins`` key: None or a list of strings) resolved against ``base``."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"config key '{key}': expected a list of .py files or module names (got {value!r})")
    return [resolve(v.strip(), base) for v in value]


def import_plugins(specs: list[str]) -> None:
    """Import every plugin of ``specs`` not imported yet (see :func:`import_plugin`)."""
    for spec in specs:
        import_plugin(spec)


def import_plugin(spec: str) -> None:
    """Import one plugin: a file under a module name derived from its path, or a module."""
    if not is_file(spec):
        _run_import(spec, lambda: importlib.import_module(spec))
        return
    if not os.path.isfile(spec):
        raise UserError(f"plugin '{spec}': file not found")
    name = module_name(spec)
    if name in sys.modules:
        return
    module_spec = importlib.util.spec_from_file_location(name, spec)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"plugin '{spec}': not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # the methods' documentation and code digests look it up here
    loader = module_spec.loader
    try:
        _run_import(spec, lambda: loader.exec_module(module))
    except UserError:
        del sys.modules[name]
        raise


def module_name(path: str) -> str:
    """The module name a file plugin is imported under: its stem and a digest of its path."""
    digest = hashlib.sha256(path.encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() else "_" for c in Path(path).stem)
    return f"cilkit_plugin_{stem}_{digest}"


def _run_import(spec: str, load: Any) -> None:
    try:
        load()
    except Exception as e:  # the plugin's own failure, whatever it is: one line naming it
        raise UserError(f"plugin '{spec}' failed to import ({described(e)})") from None


def source_digest(specs: list[str]) -> dict[str, str]:
    """A digest of each plugin's source file (for the state-0 cache key: an edited plugin
    backbone or helper is a miss)."""
    out = {}
    for spec in specs:
        module = sys.modules.get(module_name(spec) if is_file(spec) else spec)
        path = getattr(module, "__file__", None) if module is not None else None
        try:
            out[spec] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else "unknown"
        except OSError:
            out[spec] = "unreadable"
    return out
