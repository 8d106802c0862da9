"""What every corpus script shares: the framework switch, the Trainer's scaling flags, and the
final line of JSON the corpus test reads.

A corpus script runs as ``python tests/corpus/<name>.py --framework raylight|lightning``.
Importing this module takes ``--framework`` off ``sys.argv`` (so a script's own argument parser
sees only its arguments) and seeds Python, NumPy and torch, so that both frameworks build the
model from the same initial weights.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

FRAMEWORKS = ("raylight", "lightning")
SEED = 1234


def _take_framework(argv: list[str]) -> str:
    for index, arg in enumerate(argv):
        if arg == "--framework" and index + 1 < len(argv):
            value = argv[index + 1]
            del argv[index : index + 2]
        elif arg.startswith("--framework="):
            value = arg.partition("=")[2]
            del argv[index]
        else:
            continue
        if value not in FRAMEWORKS:
            raise SystemExit(f"--framework {value!r}: use one of {', '.join(FRAMEWORKS)}")
        return value
    raise SystemExit("a corpus script needs --framework raylight or --framework lightning")


FRAMEWORK = _take_framework(sys.argv)
RAYLIGHT = FRAMEWORK == "raylight"
random.seed(SEED)
np.random.seed(SEED)
torch.manual_seed(SEED)


def scale(*, ddp_unused_parameters: bool = False, **flags: Any) -> dict[str, Any]:
    """The Trainer's scaling flags for this framework, plus the script's length flags.

    raylight runs two CPU workers under DDP; Lightning runs one CPU device, without DDP. Both
    get the same length flags, which count batches per rank, so both take the same number of
    optimizer steps. ``ddp_unused_parameters`` is for modules whose steps leave parameters
    without a gradient (a GAN's generator step): under DDP, Lightning needs
    ``strategy="ddp_find_unused_parameters_true"`` for them too.
    """
    if RAYLIGHT:
        scaling: dict[str, Any] = {"num_workers": 2}
        if ddp_unused_parameters:
            scaling["strategy"] = "ddp_find_unused_parameters_true"
    else:
        scaling = {"accelerator": "cpu", "devices": 1}
    return {**scaling, **flags}


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def report(*sources: Mapping[str, Any], **values: Any) -> None:
    """Print one line of JSON: the scalar metrics of ``sources`` (callback_metrics, the dicts
    ``test`` returns) and ``values``, later ones winning; the corpus test reads this line."""
    merged: dict[str, float] = {}
    for source in (*sources, values):
        for key, value in source.items():
            number = _number(value)
            if number is not None:
                merged[key] = number
    print(json.dumps({"framework": FRAMEWORK, "metrics": merged}, sort_keys=True), flush=True)


def tensorboard_images(log_dir: str) -> int:
    """How many images the TensorBoard event files under ``log_dir`` hold, so a script can
    report that its ``logger.experiment.add_image`` calls reached the disk."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(log_dir, size_guidance={"images": 0})
    accumulator.Reload()
    return sum(len(accumulator.Images(tag)) for tag in accumulator.Tags()["images"])
