"""Every random choice of a run flows from its seed through here: one derived seed per purpose,
so that adding a random draw somewhere never shifts the draws of another part."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def derive_seed(seed: int, *parts: Any) -> int:
    """A stable 63-bit seed from the run seed and a purpose (e.g. ``"state", 3``)."""
    text = json.dumps([seed, *parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def seeded_generator(seed: int, *parts: Any) -> torch.Generator:
    """A CPU generator of its own for one purpose (:func:`derive_seed`)."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
