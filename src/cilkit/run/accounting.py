"""Memory-aligned accounting: what a state's model and memory weigh, in bytes as stored.

Zhou et al. ("A Model or 603 Exemplars: Towards Memory-Efficient Class-Incremental Learning",
ICLR 2023) count the model against the memory budget: one ResNet-32 (0.46M float32
parameters, about 1.86 MB) weighs as much as about 603 CIFAR images (3x32x32 uint8, 3072
bytes). Every state's results record the figures (:func:`state_accounting`, results.json's
``states[b]["accounting"]``); ``memory.budget_bytes`` sizes the memory from them
(:func:`exemplar_total`, :func:`cilkit.cil.memory.shared_budget_total`): B bytes that the model
and the exemplars share, the memory holding ``(B - model bytes) // one image's bytes`` images
after each state (re-balanced as ``memory.total`` is), so a model that grows keeps fewer. It
replaces ``memory.total`` and ``memory.per_class`` (beside either it is refused). In bytes, not
in images: a byte is one budget whatever the images' format (a count of images would change its
meaning with ``data.channels`` or ``data.image_size``), and it is the unit the paper reports.

- The model's bytes are its state dict's tensors, ``numel * element_size`` each: the
  parameters and the buffers (BatchNorm running statistics and counters), in the dtype the
  checkpoint stores them (float32 also under ``amp``, which autocasts the computation only).
- One training image as stored: an in-memory set's one image, its dtype and shape (uint8 1x28x28
  for Fashion-MNIST, 3x32x32 for CIFAR); images read from files count as decoded to uint8 at
  the run's size (channels x side x side), not as their compressed files.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cilkit.cil.memory import shared_budget_total
from cilkit.common.errors import UserError
from cilkit.data.base import ImageSet, TensorImages
from cilkit.settings.config import MemoryConfig


def model_parameters(model: nn.Module) -> int:
    """The model's parameters (every one, frozen or not)."""
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    """The bytes of the model's state dict: every parameter and buffer, ``numel * element_size``."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def stored_image_bytes(images: ImageSet) -> int:
    """The bytes of one image of ``images`` as the run holds it: an in-memory set's image in its
    dtype and shape; a set read from files, one image decoded to uint8 (channels x side x side)."""
    if isinstance(images, TensorImages):
        return int(images.images[0].numel() * images.images.element_size()) if len(images) else 0
    channels, side = images.geometry
    return channels * side * side


def check_budget(memory: MemoryConfig, model: nn.Module) -> None:
    """Refuse, before anything trains, a ``memory.budget_bytes`` smaller than the model as built."""
    if memory.budget_bytes is not None and (size := model_bytes(model)) > memory.budget_bytes:
        raise UserError(f"memory.budget_bytes {memory.budget_bytes} is smaller than the model it must hold "
                        f"({size} bytes as built, before any class): raise it (the exemplars share what is left)")


def exemplar_total(memory: MemoryConfig, model: nn.Module, image_bytes: int, state: int) -> int | None:
    """The images the memory of 0-based ``state`` may hold under ``memory.budget_bytes``, the model
    as it is now (when the memory is filled); None without a shared budget (the config's
    ``total`` or ``per_class`` hold)."""
    if memory.budget_bytes is None:
        return None
    return shared_budget_total(memory.budget_bytes, model_bytes(model), image_bytes, state)


def state_accounting(model: nn.Module, memory_images: int, image_bytes: int,
                     budget_bytes: int | None) -> dict[str, Any]:
    """A state's ``accounting`` entry: the model (after the state, as its checkpoint stores it),
    the memory, their sum, and the model in exemplars (model bytes / one image's bytes)."""
    size, memory = model_bytes(model), memory_images * image_bytes
    return {
        "model_parameters": model_parameters(model),
        "model_bytes": size,
        "image_bytes": image_bytes,
        "memory_images": memory_images,
        "memory_bytes": memory,
        "total_bytes": size + memory,
        "model_in_exemplars": size / image_bytes if image_bytes else None,
        "budget_bytes": budget_bytes,
    }
