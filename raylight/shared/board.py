"""The run's board: one small async actor per Trainer, through which the ranks tell the
driver what it does not ask for, and the driver tells the ranks to stop.

- the stop flag (``preemption``): the driver sets it once; ranks poll ``wait`` without
  blocking;
- rank 0's latest progress (``progress``), which the driver's bar reads, and the metric rows
  rank 0 logged since its last post, which the driver writes to its loggers during the epoch;
- every rank's heartbeat and stall reports (``watchdog``), which the driver reads while it
  waits for a call;
- the ranks writing their piece of an ``OnExceptionCheckpoint`` under FSDP, which the driver
  lets finish before it stops the group.

The actor holds no resources (``num_cpus=0``) and is gone with the Trainer's workers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class RunBoard:
    """Made an async actor by the driver; all of its methods return at once but ``wait``."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._progress: dict[str, Any] | None = None
        self._rows: list[tuple[int, dict[str, float]]] = []  # (step, row), until taken
        self._stalls: list[dict[str, Any]] = []
        self._beats: dict[int, float] = {}  # rank -> this actor's clock at its last beat
        self._exception_saves: dict[int, Any] = {}  # rank -> None while writing, then its report

    # ---- stop flag ----------------------------------------------------------------------------
    async def set(self) -> None:  # on the actor's event loop, where the waiters are
        self._stop.set()

    async def wait(self) -> bool:
        await self._stop.wait()
        return True

    # ---- progress -----------------------------------------------------------------------------
    async def post(self, progress: dict[str, Any], rows: list[Any] | None = None) -> None:
        self._progress = progress
        self._rows.extend(rows or [])

    async def take_rows(self) -> list[tuple[int, dict[str, float]]]:
        rows, self._rows = self._rows, []
        return rows

    async def latest(self) -> dict[str, Any] | None:
        return self._progress

    # ---- watch --------------------------------------------------------------------------------
    async def beat(self, rank: int) -> None:
        self._beats[rank] = time.monotonic()

    async def stalled(self, report: dict[str, Any]) -> None:
        self._stalls.append(report)

    async def exception_save(self, rank: int, report: dict[str, Any] | None) -> None:
        self._exception_saves[rank] = report

    async def exception_saves(self, take: bool = False) -> dict[int, Any]:
        """The reports so far; ``take`` also forgets them, so that a later failure of the
        same Trainer (a restarted group, the next fit) never waits on these."""
        saves = dict(self._exception_saves)
        if take:
            self._exception_saves.clear()
        return saves

    async def health(self) -> dict[str, Any]:
        """The stall reports so far, and how long each rank has been silent (in seconds,
        by this actor's clock, so nodes' clocks need not agree)."""
        now = time.monotonic()
        return {
            "stalls": list(self._stalls),
            "silent_s": {rank: now - at for rank, at in self._beats.items()},
        }
