"""What a run is built from, and the check that builds what can fail before anything is written:
the device and threads, the scenario, the normalisation statistics, the method and its model."""

from __future__ import annotations

import os
from typing import Any

import torch

from cilkit import distributed
from cilkit.config import RunConfig
from cilkit.data import load_dataset
from cilkit.data.base import Dataset
from cilkit.errors import UserError
from cilkit.methods import METHODS
from cilkit.methods.base import Method
from cilkit.models import load_backbone_weights
from cilkit.run import tensorboard
from cilkit.scenario import Scenario
from cilkit.seeding import derive_seed


def resolve_device(name: str) -> torch.device:
    """The run's device; under torchrun, each rank's own GPU (``cuda:LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config key 'device': '{name}' asked for, but no CUDA device is available")
    if name.startswith("cuda") and distributed.active():
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def free_cores() -> int:
    """The cores this process may use, shared with the other ranks of the run on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // distributed.local_world_size())


def with_resolved_threads(config: RunConfig) -> RunConfig:
    """``threads: null`` resolved to the cores free to this process, so that config.yaml
    records the count the numbers depend on and a resume uses the same."""
    return config if config.threads is not None else config.model_copy(update={"threads": free_cores()})


def normalisation(dataset: Dataset, scenario: Scenario) -> tuple[torch.Tensor, torch.Tensor]:
    """Known statistics, else the mean/std of the training images of state 0 (as the IL2M and
    active-IL papers prescribe for a dataset without known statistics)."""
    if dataset.mean is not None and dataset.std is not None:
        return torch.tensor(dataset.mean), torch.tensor(dataset.std)
    mean, std = dataset.train.channel_stats(scenario.state(0).train)
    return mean, std.clamp_min(1e-3)


def build_method_and_model(config: RunConfig, dataset: Dataset) -> tuple[Method, Any, int, int]:
    """The run's method, its model (seeded from the run seed, pretrained backbone weights
    loaded if asked) and the images' (channels, size): where a bad method option, backbone or
    weights file fails. Shared by :class:`~cilkit.run.loop.Run` and :func:`check_protocol`."""
    if not isinstance(config.method, str):
        raise ValueError("one method at a time (config.for_method(name))")
    method: Method = METHODS[config.method](config)
    torch.manual_seed(derive_seed(config.seed, "model"))
    channels, size = dataset.train.geometry
    model = method.build_model(channels, size)
    if config.model.weights is not None:  # a pretrained start (the head stays as built)
        load_backbone_weights(model.backbone, config.model.weights)
    return method, model, channels, size


def build_scenario(config: RunConfig, dataset: Dataset) -> Scenario:
    return Scenario(config.scenario, dataset.train.labels, dataset.test.labels, dataset.num_classes, config.seed,
                    dataset.name)


def check_protocol(config: RunConfig, dataset: Dataset | None = None) -> Dataset:
    """Load the data (unless ``dataset`` is given) and build what can fail in every method's run
    (device, scenario, method options, model, weights, the tensorboard package) without writing
    anything and without the work a run does next (normalisation statistics, moving data to the
    device): a bad data root, an impossible scenario or an unknown backbone fails here, before a
    run directory is created or touched. Returns the dataset."""
    if config.log.tensorboard:
        tensorboard.require()
    resolve_device(config.device)
    dataset = dataset if dataset is not None else load_dataset(config.data)
    build_scenario(config, dataset)
    for name in config.methods:
        build_method_and_model(config.for_method(name), dataset)
    return dataset
