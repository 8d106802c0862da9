"""seed_everything: seed Python, NumPy and torch, as Lightning's does."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int | None = None, workers: bool = False) -> int:
    """Seed every generator and record the seed so that worker ranks use it too.

    The Trainer ships the driver's generator states to the workers at ``fit`` time,
    so every rank starts from the state the driver had, as every process of a
    ``torchrun`` job would after running the same script.
    """
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    seed = int(seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = str(int(workers))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed
