"""Every option a method declares unread in state 0 (``option(..., state0=False)``) leaves state 0
alone: for every registered method and each such option, state 0 trained with the option changed
to another valid value gives the model of the unchanged run, tensor for tensor. The state-0 cache
keys a method without these options (:func:`cilkit.run.state0cache.method_signature`), so a false
declaration would hand a run the state-0 model of another."""

from __future__ import annotations

import json
import types
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import torch
from helpers import quick_overrides, registered_methods, tiny_config
from pydantic import BaseModel, ValidationError

from cilkit.settings.options import state0_free
from cilkit.settings.registry import METHODS
from cilkit.run.loop import Run

COMMON = ["threads=1", "train.epochs=1", "scenario.states=2", "state0_cache=null"]


def _cases() -> list[Any]:
    return [pytest.param(name, option, id=f"{name}.{option}")
            for name in registered_methods() for option in sorted(state0_free(METHODS[name].Config))]


def _config(tmp_path, name, *overrides):
    return tiny_config(tmp_path, f"method={name}", *COMMON, *quick_overrides(name), *overrides)


def _candidates(annotation: Any, current: Any) -> list[Any]:
    """Values of a field's type to try, near ``current``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return list(args)
    if origin in (Union, types.UnionType):
        return [v for a in args if a is not type(None) for v in _candidates(a, current)] + [None]
    if annotation is bool:
        return [not current]
    if annotation in (int, float):
        base = current if isinstance(current, (int, float)) and not isinstance(current, bool) else 1
        return [annotation(v) for v in (base * 2, base + 1, base - 1, base / 2, 1, 2)]
    if origin is list:
        return [[1], [2], [1, 2]]
    return []


def other_value(config: type[BaseModel], options: dict[str, Any], option: str) -> Any:
    """A valid value of ``option`` other than its value in ``options`` (the method's section)."""
    current = options[option]
    for value in _candidates(config.model_fields[option].annotation, current):
        if value == current:
            continue
        try:
            config.model_validate({**options, option: value})
        except ValidationError:
            continue
        return value
    raise AssertionError(f"no other valid value of {option} (of type {config.model_fields[option].annotation})")


@pytest.fixture(scope="module")
def state0_model(tmp_path_factory):
    """The model after state 0 of a method with more overrides, trained once per module."""
    made: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def get(name: str, *overrides: str) -> dict[str, torch.Tensor]:
        key = (name, *overrides)
        if key not in made:
            d = tmp_path_factory.mktemp(name)
            run = Run(_config(d, name, *overrides), d / "run", progress=False)
            run.execute(until_state=0)
            made[key] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        return made[key]

    return get


def test_every_method_with_options_unread_in_state_0_is_covered():
    """The cases below exist (a registry or declaration that lost them would pass vacuously)."""
    ids = {p.id for p in _cases()}
    assert {"finetune.reinit_classifier", "lucir.lambda_base", "bic.temperature", "ssil.lr_by_state",
            "wa.align", "podnet.imprint", "eeil.finetune_epochs", "scail.reading"} <= ids
    assert "bic.val_ratio" not in ids and "wa.clip" not in ids  # both read in state 0


@pytest.mark.parametrize("name, option", _cases())
def test_an_option_unread_in_state_0_leaves_the_state0_model_alone(tmp_path, state0_model, name, option):
    config = METHODS[name].Config
    options = config.model_validate(_config(tmp_path, name).method_options(name)).model_dump()
    value = other_value(config, options, option)
    reference = state0_model(name)
    changed = state0_model(name, f"{name}.{option}={json.dumps(value)}")
    assert changed.keys() == reference.keys()
    moved = [k for k in reference if not torch.equal(reference[k], changed[k])]
    assert not moved, f"{name}.{option}={value!r} changed the state-0 model ({', '.join(moved[:3])}): state 0 reads it"


def test_other_value_picks_a_valid_different_value():
    class Opts(BaseModel):
        ratio: float = 0.9
        count: int | None = None
        kind: Literal["a", "b"] = "a"
        flag: bool = True
        steps: list[int] = [10]

    from pydantic import Field

    class Bounded(BaseModel):
        ratio: float = Field(0.9, gt=0, le=1)

    options = Opts().model_dump()
    assert [other_value(Opts, options, k) for k in options] == [1.8, 2, "b", False, [1]]
    assert other_value(Bounded, {"ratio": 0.9}, "ratio") == 0.45
