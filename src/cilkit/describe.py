"""What ``cilkit info`` prints: the registries, and one method's documentation and options.

A method's options are its config class's fields; each one's description is the field's
``description`` if it has one, else the comment written beside or directly above it in the
source (so the source stays the one place where an option is explained).
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from pydantic import BaseModel

from cilkit.errors import UserError, unknown_name
from cilkit.rectify import RECTIFIERS
from cilkit.registry import BACKBONE_DESCRIPTIONS, METHODS, SOURCE_DESCRIPTIONS, SOURCE_OPTIONS

SELECTION_DESCRIPTIONS = {
    "herding": "iCaRL herding: greedy picks keeping the exemplar mean closest to the class mean",
    "random": "seeded random picks",
}
RECTIFIER_DESCRIPTIONS = {
    "il2m": "IL2M: old-class scores times init/current mean score and state confidences (cilkit calibrate)",
    "scaling": "class prediction scaling: softmax times N / n_j of the training counts (cilkit calibrate)",
    "scail": ("ScaIL: old classes scored with their first-learned classifier rows, rescaled (stored features; "
              "fine-tuning runs)"),
    "none": "the stored logits as they are",
}


def overview() -> str:
    """Every registered dataset, method, backbone, selection strategy and rectifier."""
    sections = [
        ("datasets", SOURCE_DESCRIPTIONS),
        ("methods", {k: m.description for k, m in METHODS.items()}),
        ("backbones", BACKBONE_DESCRIPTIONS),
        ("selection strategies (memory.selection)", SELECTION_DESCRIPTIONS),
        ("rectifiers (cilkit calibrate --with)", {k: RECTIFIER_DESCRIPTIONS.get(k, "") for k in RECTIFIERS}),
    ]
    lines = []
    for title, items in sections:
        lines.append(f"{title}:")
        lines += [f"  {k:<16} {items[k]}" for k in sorted(items)]
        lines.append("")
    lines.append("cilkit info NAME: a method's paper, readings and options; a dataset's or backbone's line")
    return "\n".join(lines)


def describe(name: str) -> str:
    """A method's module documentation and its options (type, default, description); a
    dataset's, backbone's or rectifier's one line. An unknown name is a UserError."""
    if name in METHODS:
        cls = METHODS[name]
        doc = inspect.getdoc(sys.modules[cls.__module__]) or cls.description
        options = option_lines(name, cls.Config)
        return "\n".join([doc, "", f"options (--set {name}.KEY=VALUE, or under '{name}:' in a config):", *options]
                         if options else [doc, "", "options: none"])
    if name in SOURCE_OPTIONS:
        return "\n".join([f"{name}: {SOURCE_DESCRIPTIONS[name]}", "", "options (--set data.options.KEY=VALUE):",
                          *option_lines("data.options", SOURCE_OPTIONS[name])])
    for table in (SOURCE_DESCRIPTIONS, BACKBONE_DESCRIPTIONS, SELECTION_DESCRIPTIONS, RECTIFIER_DESCRIPTIONS):
        if name in table:
            return f"{name}: {table[name]}"
    known = {*METHODS, *SOURCE_DESCRIPTIONS, *BACKBONE_DESCRIPTIONS, *SELECTION_DESCRIPTIONS, *RECTIFIER_DESCRIPTIONS}
    raise UserError(f"cilkit info: {unknown_name('name', name, known, plugin=True)}")


def option_lines(prefix: str, config: type[BaseModel]) -> list[str]:
    """``  prefix.key (type, default value): description`` for each field of ``config``."""
    found = source_options(config)
    lines = []
    for key, field in config.model_fields.items():
        kind, comment = found.get(key, ("", ""))
        text = field.description or comment
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        head = f"  {prefix}.{key} ({kind or 'value'}, {default})"
        lines.append(head + (":" if text else ""))
        lines += [f"      {line}" for line in textwrap.wrap(text, 88)]
    return lines


def source_options(config: type[BaseModel]) -> dict[str, tuple[str, str]]:
    """``{field: (annotation, comment)}`` from the source of ``config`` and its bases: the
    comment at the end of the field's line, or else the comment lines directly above it."""
    out: dict[str, tuple[str, str]] = {}
    for cls in reversed(config.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            lines, _ = inspect.getsourcelines(cls)
        except (OSError, TypeError):
            continue
        body = textwrap.dedent("".join(lines))
        for node in ast.parse(body).body[0].body:  # type: ignore[attr-defined]
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                src = body.splitlines()
                out[node.target.id] = (ast.unparse(node.annotation), _comment_of(src, node.lineno - 1))
    return out


def _comment_of(src: list[str], row: int) -> str:
    line = src[row]
    if "#" in line and line.index("#") > len(line) - len(line.lstrip()):
        return line.split("#", 1)[1].strip()
    above: list[str] = []
    k = row - 1
    while k >= 0 and src[k].strip().startswith("#"):
        above.insert(0, src[k].strip().lstrip("#").strip())
        k -= 1
    return " ".join(above)


def version_line() -> str:
    import cilkit
    import torch

    return f"cilkit {cilkit.__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"
