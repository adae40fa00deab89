"""Small fast configs for end-to-end tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cilkit.settings.config import RunConfig, apply_overrides, validate

TIMING_KEYS = {"time_s", "train_seconds", "images_per_second", "wall_time_s", "state0_cached", "provenance"}


def tiny_config(tmp_path, *overrides: str, **extra: Any) -> RunConfig:
    data = tiny_dict(tmp_path)
    data.update(extra)
    return validate(apply_overrides(data, list(overrides)))


def tiny_dict(tmp_path) -> dict[str, Any]:
    """The settings of :func:`tiny_config` as a plain dict (for a YAML file given to the CLI)."""
    return {
        "name": "tiny",
        "seed": 3,
        "method": "finetune",
        "data": {"name": "digits"},
        "scenario": {"initial": 4, "increment": 3, "states": 3},
        "memory": {"total": 60},
        "model": {"backbone": "convnet", "width": 8},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "eval_batch_size": 512},
        "state0_cache": str(tmp_path / "cache"),
        "threads": 2,
    }


def registered_methods() -> list[str]:
    """Every method of the registry (:data:`cilkit.settings.registry.METHODS`) as the tests are collected:
    the package's, and the one-file methods conftest.py registers (tests/methods/, examples/);
    not those a test module registers for its own use. The tests parametrised over the registry
    take their names from here, so a method is covered the day it is registered."""
    from cilkit.settings.registry import METHODS

    return sorted(name for name, cls in METHODS.items() if not cls.__module__.rpartition(".")[2].startswith("test_"))


def quick_overrides(name: str) -> list[str]:
    """The ``quick`` settings a method's config declares (:func:`cilkit.settings.options.quick`), as
    ``--set`` items."""
    from cilkit.settings.options import quick
    from cilkit.settings.registry import METHODS

    return [f"{key}={json.dumps(value)}" for key, value in quick(METHODS[name].Config).items()]


def method_cases(variants: dict[str, tuple[str, list[str]]] | None = None) -> list[Any]:
    """``pytest.param(name, overrides)`` for every registered method with its quick settings,
    then each variant (``{id: (method, more overrides)}``: a path the defaults do not take)."""
    import pytest

    cases = [pytest.param(name, quick_overrides(name), id=name) for name in registered_methods()]
    cases += [pytest.param(name, quick_overrides(name) + extra, id=label)
              for label, (name, extra) in (variants or {}).items()]
    return cases


def strip_timings(obj: Any) -> Any:
    """Results without wall-clock figures, for equality between runs."""
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    """The one line a user error printed on stderr (beginning ``error: ``)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def state_context(cfg: RunConfig, run_dir: Path, b: int) -> tuple[Any, Any]:
    """A run trained through state ``b - 1`` and the context of state ``b`` after the method's
    ``before_state``: where a test reads a method's loss on a real state."""
    from cilkit.run.loop import Run

    run = Run(cfg, run_dir, progress=False)
    if b > 0:
        run.execute(until_state=b - 1)
    ctx = run.context(b)
    run.method.before_state(ctx)
    return run, ctx


def assert_value_and_gradient(ours: Any, z: Any, reference: Any, atol: float = 1e-10) -> None:
    """``ours`` (a loss of the leaf ``z``) equals ``reference(z')`` on a copy ``z'`` of ``z``,
    and so do their gradients."""
    import torch

    ref_z = z.detach().clone().requires_grad_(True)
    ref = reference(ref_z)
    assert torch.allclose(ours, ref, atol=atol), (float(ours), float(ref))
    ours.backward()
    ref.backward()
    assert torch.allclose(z.grad, ref_z.grad, atol=atol)


def total(terms: Any) -> Any:
    """A loss's named terms summed as the engine sums them (in order): the loss it trains on."""
    from cilkit.training.engine import summed_terms

    return summed_terms(terms)[0]


def one_line_error(capsys, argv: list[str]) -> str:
    """The one stderr line of a ``cilkit`` command (``argv``) that exits with status 2."""
    from cilkit.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]
