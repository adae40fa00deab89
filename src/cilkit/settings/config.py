"""Typed run configuration: YAML loading, ``--set`` overrides, validation with clear errors.

Every key of a run lives here, with its default. A method's own hyperparameters live in the
method's ``Config`` (a pydantic model declared in its file) and are given in the YAML under a
top-level key named after the method (e.g. ``icarl: {temperature: 2}``); a data reader's own
keys live in the model its ``register_source`` declared and are given under ``data.options``.
Plugins (``plugins:``, ``cilkit run --plugin``) are imported by :func:`validate`, before the
names of methods, backbones and datasets are checked against the registries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cilkit.common.errors import UserError, did_you_mean, first_error, unknown_name
from cilkit.settings.overrides import apply_overrides, check_methods, overrides_of, resolved
from cilkit.settings.imbalance import ImbalanceConfig, Strict
from cilkit.settings.paper import PaperTarget
from cilkit.settings.options import StrictNumbers, refuse_loose_numbers
from cilkit.settings.packaged import quickstart_dict, resolve_config
from cilkit.settings.plugins import import_plugins, plugin_list
from cilkit.settings.registry import BACKBONES, METHODS, SOURCE_OPTIONS, SOURCES

OptionsModel = TypeVar("OptionsModel", bound=BaseModel)
DEFAULT_TEST_FRACTION = 0.2
VALUE_KINDS = {"memory.selection": "selection strategy"}  # what a Literal key's values are called, in errors


class SyntheticConfig(Strict):
    num_classes: int = Field(10, ge=2)
    train_per_class: int = Field(40, ge=1)
    test_per_class: int = Field(10, ge=1)
    size: int = Field(8, ge=4)
    channels: Literal[1, 3] = 1


class DataConfig(Strict):
    """Where the images come from. See ``cilkit info`` for the sources."""

    name: str = "digits"
    root: str | None = None  # folder of the files (idx, cifar, imagefolder, listfile)
    # listfile: "path label" per line, with every class in both lists; the labels are all class
    # ids 0..C-1 or all class names (class k: the k-th name in sorted order). A relative
    # list path is read from data.root when root is set (else from the working directory); the
    # image paths inside are relative to data.root, else to the list file's folder.
    train_list: str | None = None
    test_list: str | None = None
    # file images: training crop / eval crop size. Unset: the images' own size (they must all
    # have one size; a non-square size gives centre crops of its shorter side, not rescaled).
    image_size: int | None = Field(None, ge=4)
    resize: int | None = Field(None, ge=4)  # file images: eval resize before the centre crop
    # file images: 1 (grayscale) or 3 (RGB); unset: 3 if any checked image is colour, else 1.
    channels: Literal[1, 3] | None = None
    # file images, checked at load before any training: "full" decodes every file; "quick"
    # decodes a fixed-seed sample (one image per class and split, plus 256) and reads sizes
    # and colour from it alone. Both check every label, class count and path in full.
    check: Literal["full", "quick"] = "full"
    in_memory: bool = False  # file images: decode once into memory at image_size
    workers: int = Field(2, ge=0)  # file images: DataLoader workers
    # the share of each class split off, stratified and fixed, as the test set of a source without
    # one: digits (default 0.2) and an imagefolder without val/ or test/ (only when set)
    test_fraction: float | None = Field(None, gt=0, lt=1)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    mean: list[float] | None = None  # override the known / computed statistics
    std: list[float] | None = None
    crop_pad: int | None = Field(None, ge=0)  # override the dataset's default augmentation
    flip: bool | None = None
    # the reader's own keys, validated by the options model its register_source declared
    # (stored with their defaults filled in); see source_options
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _default_test_fraction(cls, data: Any) -> Any:
        """Unset means 0.2 for every source but imagefolder (which splits only when asked): the
        value recorded, compared and keyed for state 0 stays the one cilkit always wrote."""
        if isinstance(data, dict) and data.get("test_fraction") is None and data.get("name") != "imagefolder":
            return {**data, "test_fraction": DEFAULT_TEST_FRACTION}
        return data

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in SOURCES:
            raise ValueError(unknown_name("dataset", v, SOURCES, plugin=True))
        return v

    @field_validator("options", mode="before")
    @classmethod
    def _source_options(cls, v: Any, info: ValidationInfo) -> Any:
        name = info.data.get("name")
        if name is None:  # an unknown dataset, reported on its own
            return v
        model = SOURCE_OPTIONS.get(name)
        if model is None:
            if v:
                raise ValueError(f"config key 'data.options': dataset '{name}' takes no options")
            return {}
        refuse_loose_numbers(model, v, prefix="data.options")  # a plugin's model need not derive from StrictNumbers
        try:
            return model.model_validate(v if v is not None else {}).model_dump(mode="json")
        except ValidationError as e:
            raise ValueError(first_error(e, prefix="data.options", model=model)) from None

    def source_options(self, model: type[OptionsModel]) -> OptionsModel:
        """``data.options`` as the reader's options model (validated with the config)."""
        return model.model_validate(self.options)


class ScenarioConfig(Strict):
    """Class order and states. ``order`` is a seed (``numpy.random.seed(s); permutation``, the
    iCaRL convention, default 1993) or an explicit list of class ids."""

    order: int | list[int] = 1993  # a seed is numpy's: 0 .. 2**32 - 1
    initial: int = Field(2, ge=1)  # B: classes of state 0
    increment: int = Field(2, ge=1)  # P: classes added by each later state
    states: int | None = Field(None, ge=1)  # default: as many as the classes allow
    val_per_class: int = Field(0, ge=0)  # balanced hold-out taken from each class's train data
    imbalance: ImbalanceConfig = Field(default_factory=ImbalanceConfig)

    @field_validator("order")
    @classmethod
    def _numpy_seed(cls, order: int | list[int]) -> int | list[int]:
        if isinstance(order, int) and not 0 <= order < 2**32:
            raise ValueError("a class-order seed must lie in 0 .. 2**32 - 1 (numpy's seeds)")
        return order


class MemoryConfig(Strict):
    """Exemplar memory. ``total`` = K images over all seen classes (re-balanced after each
    state), or ``per_class`` = m images per class. Setting neither (or total: 0) = no memory."""

    total: int | None = Field(None, ge=0)
    per_class: int | None = Field(None, ge=0)
    budget_bytes: int | None = Field(None, gt=0)  # in place of both: shared with the model (cilkit.run.accounting)
    selection: Literal["herding", "random"] = "herding"

    @model_validator(mode="after")
    def _one_budget(self) -> "MemoryConfig":
        if self.total is not None and self.per_class is not None:
            raise ValueError("set memory.total or memory.per_class, not both (over a config that sets one, "
                             "--set memory.total=null or --set memory.per_class=null clears it)")
        other = "memory.total" if self.total is not None else "memory.per_class" if self.per_class is not None else None
        if self.budget_bytes is not None and other is not None:
            raise ValueError(f"memory.budget_bytes (the model's and the exemplars' bytes) replaces {other}: set one of "
                             f"them (over a config that sets {other}, --set {other}=null clears it)")
        return self

    @property
    def enabled(self) -> bool:
        """Whether any exemplar is stored."""
        return bool(self.total) or bool(self.per_class) or self.budget_bytes is not None


class ModelConfig(Strict):
    backbone: str = "convnet"  # resnet32 | resnet18 | resnet18_cifar | convnet | lenet | a plugin's
    width: int = Field(32, ge=4)  # convnet channels (and any backbone factory taking width)
    # a state dict loaded into the backbone (not the head) after the model is built; a relative
    # path is taken from the working directory and recorded absolute
    weights: str | None = None

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"config key 'model.backbone': {unknown_name('backbone', v, BACKBONES, plugin=True)}")
        return v

    @field_validator("weights")
    @classmethod
    def _absolute_weights(cls, v: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(v)) if v else None


class ScheduleConfig(Strict):
    type: Literal["constant", "multistep", "cosine", "plateau", "sgdr"] = "multistep"
    milestones: list[int] = Field(default_factory=list)  # epochs (multistep)
    gamma: float = Field(0.1, gt=0)  # multistep / plateau factor
    patience: int = Field(5, ge=0)  # plateau, on the epoch's training loss
    # sgdr (Loshchilov & Hutter's warm restarts), read by no other type (as milestones):
    period: int = Field(1, ge=1)  # T_0, the first cycle's epochs
    period_mult: int = Field(2, ge=1)  # T_mult, each cycle this many times the previous one
    min_lr: float = Field(0.0, ge=0)  # eta_min, absolute: the lr at the end of a cycle
    warmup_epochs: int = Field(0, ge=0)  # epochs at lr * warmup_factor before the first cycle
    warmup_factor: float = Field(0.1, gt=0)


class TrainConfig(Strict):
    epochs: int = Field(10, ge=0)
    epochs_first: int | None = Field(None, ge=0)  # state 0 (default: epochs)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    lr_first: float | None = Field(None, gt=0)  # state 0 (default: lr)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"  # sgd: with momentum (the papers'); adam/adamw ignore momentum
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    clip_grad_norm: float | None = Field(None, gt=0)  # clip the gradients' global L2 norm to this after each backward
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval_batch_size: int = Field(1024, ge=1)
    # under torchrun: BatchNorm statistics of the global batch (all ranks), not of each rank's slice
    sync_bn: bool = False

    def epochs_of(self, state: int) -> int:
        return self.epochs_first if state == 0 and self.epochs_first is not None else self.epochs

    def lr_of(self, state: int) -> float:
        return self.lr_first if state == 0 and self.lr_first is not None else self.lr


class LogConfig(Strict):
    """What a run records besides results.json (run.log and history.jsonl are always written)."""

    tensorboard: bool = False  # event files under <run>/tb/ (needs the tensorboard package)
    wandb: bool = False  # a Weights & Biases run under <run>/wandb/ (needs the wandb package)
    wandb_project: str = Field("cilkit", min_length=1)
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # offline: nothing is sent; WANDB_MODE overrides


class RunConfig(StrictNumbers):
    """A whole run. Extra top-level keys must be method names holding that method's options."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str | None = None
    # methods, backbones and readers of the user's own: .py files (absolute once validated by
    # load_config) or module names, imported before validation (cilkit.settings.plugins)
    plugins: list[str] = Field(default_factory=list)
    seed: int = 0
    runs: int = Field(1, ge=1)  # > 1: seeds seed, seed+1, ... into run_<k>/ and a summary.json
    method: str | list[str] = "finetune"
    # per-method overrides of protocol keys (nested or dotted): {lwf: {memory: {total: 0}}}, or
    # --set lwf:memory.total=0; each method's runs use them (for_method), a protocol of its own
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)
    data: DataConfig = Field(default_factory=DataConfig)
    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = Field(None, ge=1)  # CPU threads (default: the cores free to us)
    amp: bool = False  # bf16 autocast (CUDA, or CPU when asked)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model's forward (one warning and eager where it cannot)
    dist_timeout_s: float = Field(300.0, gt=0)  # under torchrun: how long a rank waits for the others
    state0_cache: str | None = "~/.cache/cilkit/state0"  # null = never reuse a state-0 model
    keep_checkpoints: Literal["last", "all"] = "last"
    paper: PaperTarget | None = None  # the paper's figure for this protocol (paper configs; changes no number)

    @field_validator("method")
    @classmethod
    def _known_methods(cls, v: str | list[str]) -> str | list[str]:
        for name in [v] if isinstance(v, str) else v:
            if name not in METHODS:
                raise ValueError(unknown_name("method", name, METHODS, plugin=True))
        if isinstance(v, list) and not v:
            raise ValueError("the list of methods is empty")
        return v

    @field_validator("methods", mode="before")
    @classmethod
    def _per_method_keys(cls, v: Any) -> Any:
        return overrides_of(v)  # each entry a method's, of protocol keys only (nested, as read back)

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"unknown device '{v}' (auto, cpu, cuda or cuda:N)")
        return v

    @model_validator(mode="after")
    def _method_options(self) -> "RunConfig":
        extra = self.model_extra if self.model_extra is not None else {}
        for key, value in extra.items():
            if key not in METHODS:
                hint = did_you_mean(key, [*RunConfig.model_fields, *METHODS])
                raise ValueError(f"unknown key '{key}'" + (f": {hint}" if hint else ""))
            try:
                validated = METHODS[key].Config.model_validate(value or {})
            except ValidationError as e:
                raise ValueError(first_error(e, prefix=key, model=METHODS[key].Config)) from None
            extra[key] = validated.model_dump()
        return self

    @model_validator(mode="after")
    def _each_method_as_it_runs(self) -> "RunConfig":
        check_methods(self, VALUE_KINDS)  # valid with its overrides; a memory only as the method declares
        return self

    @property
    def method_names(self) -> list[str]:
        """The methods the config runs (``method``: one name or a list), in order."""
        return [self.method] if isinstance(self.method, str) else list(self.method)

    def method_options(self, name: str) -> dict[str, Any]:
        return dict((self.model_extra or {}).get(name) or {})

    def for_method(self, name: str) -> "RunConfig":
        """This config with a single method (one run of a multi-method comparison), its
        overrides of ``methods`` applied (and ``methods`` then empty: a run's config is resolved).
        A config that does not validate so is one ``UserError`` line naming the method and the key."""
        try:
            return self.validated_for(name)
        except ValidationError as e:
            raise UserError(f"method '{name}': {first_error(e, model=RunConfig, kinds=VALUE_KINDS)}") from None

    def validated_for(self, name: str) -> "RunConfig":
        """:meth:`for_method`, raising pydantic's ``ValidationError`` (the check of ``methods``
        while the config validates, which names the key under ``methods.<name>``)."""
        data = resolved(self.to_dict(), name)
        data["method"] = name
        data["name"] = f"{self.name}/{name}" if self.name else name
        return RunConfig.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")  # as config.yaml records it: methods only when it holds overrides
        return data if data["methods"] else {k: v for k, v in data.items() if k != "methods"}


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file '{path}' is a directory, not a YAML file")
    if not path.is_file():
        raise UserError(f"config file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"config file '{path}': not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UserError(f"config file '{path}' cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None)
        raise UserError(f"config file '{path}'{where}: invalid YAML ({problem or 'unreadable'})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}': expected a mapping of keys at the top level")
    return data


def validate(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Import the config's plugins (relative files from the working directory; load_config
    resolves a file's own against its folder first), then validate it; the first error is one
    line naming the key."""
    if data.get("plugins") is not None:
        try:
            plugins = plugin_list(data["plugins"], Path.cwd())
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        import_plugins(plugins)
        data = {**data, "plugins": plugins}
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{source}: {first_error(e, model=RunConfig, kinds=VALUE_KINDS)}") from None


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | None = None, plugins: list[str] | None = None
) -> RunConfig:
    """Read a YAML file (a bare name not a file: the packaged config; the embedded quickstart
    when ``path`` is None), apply ``--set``, add the ``--plugin`` values (relative to the working
    directory) to the file's ``plugins`` (relative to its folder), import them all and validate."""
    path = resolve_config(path) if path is not None else None
    data = quickstart_dict() if path is None else read_yaml(path)
    data = apply_overrides(data, overrides or [])
    source = str(path) if path else "quickstart config"
    base = Path(path).resolve().parent if path else Path.cwd()
    try:
        listed = plugin_list(data.get("plugins"), base) + plugin_list(plugins, Path.cwd(), key="--plugin")
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    if listed:
        data["plugins"] = list(dict.fromkeys(listed))  # each once, in order
    return validate(data, source=source)
