"""Plugins: a user's own methods, backbones and data readers, imported before a config is read.

A plugin is a Python file (``my_method.py``; a relative path is resolved against the config
file's folder for the ``plugins:`` key, against the working directory for ``--plugin``) or an
importable module name (``mypackage.cil``). Importing it runs its ``register_method`` /
``register_backbone`` / ``register_source`` decorators (:mod:`cilkit.settings.registry`), so the
config's names are checked against registries that hold it. Each plugin is imported once per
process; a run records its plugins as absolute paths in config.yaml, so ``--resume`` imports
them again. A missing file, a failed import, a plugin that raises or calls ``sys.exit`` while
it is imported is one ``UserError`` line naming the plugin and the cause.

A plugin's code (:func:`plugin_sources`: what the state-0 cache key and a checkpoint's code
version hash, :func:`source_digest`, and where :func:`plugin_failure` looks for the frame that
raised) is more than its own file:

- a module of a package (``mypackage.cil``): every ``.py`` file of its top-level package
  (``mypackage``), as the files are now;
- a file (or a top-level module that is one file): the file and the modules loaded from its
  folder or below it once its import ran — found in ``sys.modules`` right after the import, by
  their ``__file__`` — so a helper beside it (``import helper``, ``from mylib import losses``)
  counts. Not counted: libraries installed under that folder (a ``site-packages`` of a virtual
  environment there), other file plugins there (each has its own digest), cilkit's own modules
  (the package digest holds them), and a module the plugin imports only later, inside a hook.

The files are listed when the import runs and read when a digest is taken.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
import types
from pathlib import Path
from typing import Any

from cilkit.common.errors import UserError, described

FILE_PLUGIN_PREFIX = "cilkit_plugin_"  # the module names of file plugins (module_name)
INSTALLED = frozenset({"site-packages", "dist-packages"})  # folders of installed libraries, never a plugin's code
_LOADED: dict[str, dict[str, Path]] = {}
# ^ a plugin, as given -> the source files its import loaded beside it, by name (plugin_sources:
#   what a file plugin or a top-level module of one file is made of); set when the import runs


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
    """Import one plugin: a file under a module name derived from its path, or a module; then
    note the files its import loaded (:func:`plugin_sources`)."""
    fresh = _import_module(spec) if not is_file(spec) else _import_file(spec)
    if fresh or spec not in _LOADED:
        module = sys.modules.get(module_name(spec) if is_file(spec) else spec)
        path = getattr(module, "__file__", None)
        _LOADED[spec] = loaded_beside(Path(os.path.abspath(path))) if isinstance(path, str) else {}


def _import_module(spec: str) -> bool:
    """Import the module plugin ``spec``; whether its import ran now (not imported before)."""
    fresh = spec not in sys.modules
    _run_import(spec, lambda: importlib.import_module(spec))
    return fresh


def _import_file(spec: str) -> bool:
    """Import the file plugin ``spec``; whether its import ran now (not imported before)."""
    if not os.path.isfile(spec):
        raise UserError(f"plugin '{spec}': file not found")
    name = module_name(spec)
    if name in sys.modules:
        return False
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
    return True


def module_name(path: str) -> str:
    """The module name a file plugin is imported under: its stem and a digest of its path."""
    digest = hashlib.sha256(path.encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() else "_" for c in Path(path).stem)
    return f"{FILE_PLUGIN_PREFIX}{stem}_{digest}"


def _run_import(spec: str, load: Any) -> None:
    try:
        load()
    except SystemExit as e:  # an exit in a plugin's import would end cilkit without a word
        raise UserError(f"plugin '{spec}' called sys.exit({e.code!r}) while it was imported: a plugin defines and "
                        "registers methods, backbones or datasets, and returns") from None
    except Exception as e:  # the plugin's own failure, whatever it is: one line naming it
        raise UserError(f"plugin '{spec}' failed to import ({described(e)})") from None


def loaded_beside(path: Path) -> dict[str, Path]:
    """``path`` and the source file of every module in ``sys.modules`` that lies in its folder or
    below it, but those of installed libraries there (:data:`INSTALLED`), by their names
    relative to that folder. Other file plugins (imported under :data:`FILE_PLUGIN_PREFIX`) and
    cilkit's own modules (a checkout below that folder) aside."""
    folder = path.parent
    found = {path}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.startswith(FILE_PLUGIN_PREFIX) or name.partition(".")[0] == "cilkit":
            continue  # another file plugin is a plugin of its own; cilkit has its digest (a checkout below)
        if not isinstance(file, str) or not file.endswith(".py"):
            continue
        if os.path.abspath(file).startswith(f"{folder}{os.sep}"):
            found.add(Path(os.path.abspath(file)))
    return {str(p.relative_to(folder)): p for p in sorted(found)
            if p == path or INSTALLED.isdisjoint(p.relative_to(folder).parts)}


def plugin_sources(spec: str) -> dict[str, Path]:
    """A plugin's source files (see the module's docstring) by their names relative to its
    top-level package's parent folder or its file's folder; empty for a plugin not imported."""
    top = None if is_file(spec) else sys.modules.get(spec.partition(".")[0])
    folders = [Path(os.path.abspath(p)) for p in getattr(top, "__path__", None) or []]
    if folders:  # a module of a package: every file of the top-level package
        return {str(f.relative_to(folder.parent)): f for folder in folders for f in sorted(folder.rglob("*.py"))}
    return _LOADED.get(spec, {})


def source_digest(specs: list[str]) -> dict[str, str]:
    """A digest of each plugin's source files (:func:`plugin_sources`), their names and bytes:
    for the state-0 cache key and the code version a checkpoint records (an edited plugin, or a
    helper module of it, is a miss)."""
    return {spec: _files_digest(plugin_sources(spec)) for spec in specs}


def _files_digest(files: dict[str, Path]) -> str:
    if not files:
        return "unknown"
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        try:
            h.update(files[name].read_bytes())
        except OSError:
            h.update(b"unreadable")
        h.update(b"\0")
    return h.hexdigest()[:16]


def plugin_failure(e: BaseException) -> str | None:
    """Where a plugin's own code raised ``e``, for a one-line error: ``plugin method 'x' raised
    ValueError: boom in loss() at /path/x.py:12``. The frames of ``e``'s traceback are read from
    the outermost: a frame in a plugin's files (:func:`plugin_sources`) after cilkit's code is
    the hook cilkit called; the deepest frame of a plugin or of cilkit decides whose the error
    is. None when it is cilkit's (perhaps our bug: its traceback is kept) or no plugin ran."""
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the cilkit package, as imported
    theirs = {str(f) for spec in list(_LOADED) for f in plugin_sources(spec).values()}
    hook: types.FrameType | None = None
    deepest: tuple[types.FrameType, int] | None = None
    for frame, line in traceback.walk_tb(e.__traceback__):
        file = os.path.abspath(frame.f_code.co_filename)
        if file in theirs:
            hook = hook or frame
            deepest = (frame, line)
        elif file.startswith(ours):
            hook = deepest = None  # cilkit's code again: what raised below it is cilkit's, unless a plugin's
    if hook is None or deepest is None:
        return None
    frame, line = deepest
    where = f"{os.path.abspath(frame.f_code.co_filename)}:{line}"
    at = f"at {where}" if frame is hook else f"(from {frame.f_code.co_name}() at {where})"
    return f"{_owner(hook)} raised {described(e)} in {hook.f_code.co_name}() {at}"


def _owner(frame: types.FrameType) -> str:
    """``plugin method 'x'`` when ``frame`` runs a method of a registered method class, else
    ``plugin code``."""
    from cilkit.settings.registry import METHODS

    cls = type(frame.f_locals.get("self"))
    name = getattr(cls, "name", None)
    return f"plugin method '{name}'" if isinstance(name, str) and METHODS.get(name) is cls else "plugin code"
