"""Several Trainers in one driver process: pre-training then fine-tuning, a loop over
configurations, a notebook cell run twice while the earlier Trainer is still referenced.

A Trainer keeps its workers between calls (``fit`` then ``test`` reuse them), so an earlier
Trainer that sits idle still holds its workers' resources. When a new group does not fit
in what is free, the idle workers of this process's other Trainers are stopped, with one
line saying so; such a Trainer starts workers again when it is next used. A Trainer in
the middle of a call (another thread's) is never touched: what it holds is named in the
error when the new group cannot be placed.
"""

from __future__ import annotations

import sys
import time
import weakref
from typing import Any

import ray

from raylight.driver.placement import fitting_workers

# The one process-wide fact here: which Trainers of this process hold workers. Weak, so
# that a Trainer that is gone holds nothing.
_holders: weakref.WeakSet[Any] = weakref.WeakSet()

_FREED_WAIT_S = 10.0  # how long Ray's free-resource view may lag a removed placement group


def holds_workers(trainer: Any) -> None:
    _holders.add(trainer)


def let_go(trainer: Any) -> None:
    _holders.discard(trainer)


def others(trainer: Any) -> list[Any]:
    return [t for t in list(_holders) if t is not trainer and t._holds_workers()]


def make_room(trainer: Any, bundle: dict[str, float], count: int) -> None:
    """Stop the idle workers of this process's other Trainers when ``count`` workers of
    ``bundle`` do not fit in the free resources now; return once Ray shows them free."""
    if fitting_workers(bundle, ray.available_resources()) >= count:
        return
    idle = [t for t in others(trainer) if not t._busy]
    if not idle:
        return
    workers = sum(t._group.size for t in idle)
    held = total_held(idle)
    for other in idle:
        other._release_workers()
    print(
        f"raylight: stopped the idle workers of {len(idle)} earlier Trainer(s) of this "
        f"script ({workers} workers holding {held}) to make room for this one; such a "
        "Trainer starts its workers again when it is used again.",
        file=sys.stderr,
        flush=True,
    )
    deadline = time.monotonic() + _FREED_WAIT_S
    while (
        time.monotonic() < deadline
        and not fitting_workers(bundle, ray.available_resources()) >= count
    ):
        time.sleep(0.1)


def total_held(trainers: list[Any]) -> dict[str, float]:
    """The resources the workers of ``trainers`` hold."""
    held: dict[str, float] = {}
    for other in trainers:
        for name, amount in other.scaling.bundle().items():
            held[name] = held.get(name, 0.0) + amount * other._group.size
    return held
