"""Stopping a fit early and cleanly: on SIGTERM or Ctrl-C on the driver, or SIGTERM on a
worker (a spot node being preempted), the ranks agree on one batch, save a checkpoint
there, and end the epoch; the run resumes from it with ``ckpt_path="last"``.

Ranks must stop at the same batch, or the ones still training would wait in collectives
for the ones that stopped. So each rank notes its reason to stop locally (a signal, or the
driver's request on the run's board, ``shared.board.RunBoard``, polled without blocking), and at
agreed batches the ranks all-reduce their notes. Agreement costs one tiny collective about twice a second,
whatever the batch time: the ranks also agree on how many batches to the next check.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

CHECKS_PER_SECOND = 2.0


class StopCheck:
    """A rank's side: local reasons to stop, and the schedule of agreements."""

    def __init__(self, flag: Any, world_size: int) -> None:
        self.world_size = world_size
        self.signalled = False
        self._flag_ref = flag.wait.remote() if flag is not None else None
        self._next_check = 1  # in batches that stepped
        self._batches = 0
        self._since = time.monotonic()

    def install_sigterm(self) -> None:
        """A SIGTERM to this worker (its node is going away) asks for a clean stop."""

        def on_sigterm(signum: int, frame: Any) -> None:
            self.signalled = True

        signal.signal(signal.SIGTERM, on_sigterm)

    def _wanted_here(self) -> bool:
        if self.signalled:
            return True
        if self._flag_ref is None:
            return False
        import ray

        ready, _ = ray.wait([self._flag_ref], timeout=0)
        return bool(ready)

    def should_stop(self, device: torch.device) -> bool:
        """Call after every batch that stepped; every rank calls it equally often."""
        self._batches += 1
        if self._batches < self._next_check:
            return False
        elapsed = time.monotonic() - self._since
        per_batch = elapsed / self._batches
        # Batches to the next check: about 1/CHECKS_PER_SECOND seconds' worth of them.
        proposal = max(1, min(10_000, math.ceil(1.0 / (CHECKS_PER_SECOND * max(per_batch, 1e-6)))))
        # [stop?, -proposal]: MAX gives "any rank wants to stop" and the smallest proposal.
        votes = torch.tensor([float(self._wanted_here()), -float(proposal)], device=device)
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        self._batches, self._since = 0, time.monotonic()
        self._next_check = int(-votes[1].item())
        return bool(votes[0].item())
