"""The random generators a run draws from (Python's, NumPy's and torch's CPU generator): seeding them, and
their state, which a checkpoint saves so that a resumed run samples exactly as the uninterrupted one."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators with `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The generators' current states (the keys a checkpoint's extras have always used)."""
    return {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "numpy_rng": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators to a state from `rng_state`."""
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
