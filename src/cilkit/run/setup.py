"""What a run is built from, and the check that builds what can fail before anything is written:
the device and threads, the scenario, the normalisation statistics, the method and its model."""

from __future__ import annotations

import os
from typing import Any

import torch

from cilkit.common import distributed
from cilkit.settings.config import RunConfig
from cilkit.data import load_dataset
from cilkit.data.base import Dataset
from cilkit.common.errors import UserError
from cilkit.common.machine import physical_memory
from cilkit.cil.memory import class_quotas
from cilkit.methods import METHODS
from cilkit.methods.base import Method
from cilkit.models import load_backbone_weights
from cilkit.models.size import model_bytes
from cilkit.run import tensorboard
from cilkit.cil.scenario import Scenario
from cilkit.common.seeding import derive_seed


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


THREADS_FROM_NULL = "CILKIT_THREADS_FROM_NULL"
# ^ set by with_resolved_threads to the cores free at the start when the config said threads:
#   null (an environment variable: the jobs a run spawns inherit it), so that the setup line can
#   say where its count came from although config.yaml records the number


def with_resolved_threads(config: RunConfig) -> RunConfig:
    """``threads: null`` resolved to the cores free to this process, so that config.yaml
    records the count the numbers depend on and a resume uses the same. Records which it was
    for :func:`threads_source`."""
    if config.threads is not None:
        os.environ.pop(THREADS_FROM_NULL, None)
        return config
    cores = free_cores()
    os.environ[THREADS_FROM_NULL] = str(cores)
    return config.model_copy(update={"threads": cores})


def threads_source(threads: int | None) -> str:
    """Where a run's thread count comes from, for its setup line: ``from config``, or the
    cores free at the start (all of them, or a job's share) when the config said ``threads: null``."""
    recorded = os.environ.get(THREADS_FROM_NULL, "")
    if threads is not None and not recorded.isdigit():
        return "from config"
    cores = int(recorded) if recorded.isdigit() else free_cores()
    used = threads if threads is not None else cores
    free = f"{cores} core{'s' if cores != 1 else ''} free at the start"
    return f"threads: null: the {free}" if used == cores else f"threads: null: a share of the {free}"


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
    channels, size = dataset.train.geometry
    check_model_size(config, method, channels, size)
    torch.manual_seed(derive_seed(config.seed, "model"))
    model = method.build_model(channels, size)
    if config.model.weights is not None:  # a pretrained start (the head stays as built)
        load_backbone_weights(model.backbone, config.model.weights)
    return method, model, channels, size


def build_scenario(config: RunConfig, dataset: Dataset) -> Scenario:
    return Scenario(config.scenario, dataset.train.labels, dataset.test.labels, dataset.num_classes, config.seed,
                    dataset.name)


def memory_covers_old_data(config: RunConfig, scenario: Scenario) -> str | None:
    """A warning when the memory (``memory.total`` or ``memory.per_class``) can keep every
    training image of the old classes in some state: there the protocol is not incremental
    (joint training under another name). It names the states, since a fixed total may cover
    the first few only. None otherwise."""
    if not config.memory.enabled:
        return None
    covered: list[tuple[int, int, int]] = []  # (state, old images, old classes), 1-based states
    for b in range(1, scenario.num_states):
        n_old = scenario.ends[b - 1]
        per_class = scenario.train_pos[scenario.train_indices_of(range(n_old))].bincount(minlength=n_old)
        quotas = torch.tensor(class_quotas(config.memory.total, config.memory.per_class, n_old))
        if bool((quotas >= per_class).all()):
            covered.append((b + 1, int(per_class.sum()), n_old))
    if not covered:
        return None
    key = "memory.total" if config.memory.total is not None else "memory.per_class"
    value = config.memory.total if config.memory.total is not None else config.memory.per_class
    states = [c[0] for c in covered]
    where = (f"from state {states[0]} on" if states[-1] == scenario.num_states and len(states) == states[-1] - states[0] + 1
             else f"in state{'s' if len(states) > 1 else ''} {', '.join(map(str, states))}")
    _, images, classes = covered[0]
    return (f"config key '{key}': {value} keeps every old training image {where} ({images} images of {classes} "
            f"classes in state {states[0]}): the protocol is not incremental there, it is joint training on all old data")


def idle_milestones(config: RunConfig, scenario: Scenario) -> str | None:
    """A warning when a multistep milestone is at or past the last epoch of a state, where it
    never lowers the learning rate (``train.epochs=2`` over a config's ``milestones: [4]``).
    None otherwise."""
    schedule, train = config.train.schedule, config.train
    if schedule.type != "multistep" or not schedule.milestones:
        return None
    states = [b for b in range(scenario.num_states) if max(schedule.milestones) >= train.epochs_of(b) > 0]
    if not states:
        return None
    epochs = sorted({train.epochs_of(b) for b in states})
    idle = sorted({m for m in schedule.milestones for b in states if m >= train.epochs_of(b)})
    where = "every state" if len(states) == scenario.num_states else f"state(s) {', '.join(str(b + 1) for b in states)}"
    return (f"config key 'train.schedule.milestones': {idle} at or past the last epoch "
            f"(train.epochs {', '.join(map(str, epochs))}) never lower the lr in {where}")


def estimated_model_bytes(method: Method, channels: int, size: int) -> int | None:
    """The parameter bytes of the method's model, without allocating it (:func:`cilkit.models.size.model_bytes`:
    a build on the meta device, extrapolated over ``model.width`` where a tensor is too large
    for that); None where the model cannot be built on the meta device (an op it lacks, in a
    plugin backbone's constructor)."""
    config = method.run_config

    def build_at(width: int) -> torch.nn.Module:
        at_width = config.model_copy(update={"model": config.model.model_copy(update={"width": width})})
        return (method if width == config.model.width else type(method)(at_width, method.cfg)).build_model(channels, size)

    try:
        return model_bytes(build_at, config.model.width)
    except (NotImplementedError, RuntimeError, TypeError) as e:
        if "meta" not in str(e):  # the model's own error, which its real build raises too
            raise
        return None  # an op the meta device cannot run ("Tensor.item() cannot be called on meta tensors" ...)


def check_model_size(config: RunConfig, method: Method, channels: int, size: int) -> None:
    """Refuse, naming ``model.width``, a model whose training state (weights, gradients,
    momentum and a frozen teacher: 4 copies of its parameters) cannot fit in this machine's RAM."""
    weights, ram = estimated_model_bytes(method, channels, size), physical_memory()
    if weights is None or ram is None or 4 * weights <= ram:
        return
    raise UserError(f"config key 'model.width': {config.model.width} makes a {config.model.backbone} of "
                    f"{weights / 2**30:.1f} GiB of weights, {4 * weights / 2**30:.1f} GiB to train, more than this "
                    f"machine's {ram / 2**30:.1f} GiB of memory")


def check_protocol(config: RunConfig, dataset: Dataset | None = None) -> Dataset:
    """Load the data (unless ``dataset`` is given) and build what can fail in every method's run
    (device, scenario, method options, model, weights, the tensorboard package) without writing
    anything and without the work a run does next (normalisation statistics, moving data to the
    device): a bad data root, an impossible scenario or an unknown backbone fails here, before a
    run directory is created or touched. Returns the dataset."""
    if config.log.tensorboard:
        tensorboard.require()
    if config.log.wandb:
        from cilkit.run import wandb_log

        wandb_log.require()
    # the run's thread count before any parallel region: an OpenMP pool once wider keeps its surplus
    # threads, and where idle threads spin (cilkit.common.omp) each of them would hold a core
    torch.set_num_threads(config.threads or free_cores())
    resolve_device(config.device)
    dataset = dataset if dataset is not None else load_dataset(config.data)
    scenario = build_scenario(config, dataset)
    for name in config.method_names:
        run_config = config.for_method(name)  # with the method's own protocol keys (config.methods)
        data = dataset if run_config.data == config.data else load_dataset(run_config.data)
        same = run_config.data == config.data and run_config.scenario == config.scenario
        run_scenario = scenario if same else build_scenario(run_config, data)
        method, *_ = build_method_and_model(run_config, data)
        method.check_scenario(run_scenario)
    return dataset
