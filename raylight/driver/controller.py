"""Failure policy of a fit: which failures are retried, how many, and how big the next group is.

A small state machine with no Ray calls of its own, so that a test can drive it:
``Controller.failed(error)`` either returns (retry) or raises (give up). The size of the
next group is the group's own business (``WorkerGroup._reserve``).

System failures are retried: a worker process or node that died, a lost object, a
collective that broke or timed out because a peer went away. Exceptions raised by user
code are not: running the same code again would raise them again.
"""

from __future__ import annotations

import dataclasses

import ray

from raylight.driver.group import WorkerFailure, collective_broke


class FailureLimitExceeded(RuntimeError):
    """The run failed more often than ``Trainer(max_failures=...)`` allows."""


def is_system_failure(error: BaseException) -> bool:
    """True for failures of the machinery (retried), False for errors of user code."""
    if isinstance(error, WorkerFailure):
        return True
    if isinstance(
        error,
        ray.exceptions.RayActorError
        | ray.exceptions.ObjectLostError
        | ray.exceptions.OwnerDiedError
        | ray.exceptions.NodeDiedError
        | ray.exceptions.RaySystemError,
    ):
        return True
    return collective_broke(error)


def describe(error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}"[:300]


@dataclasses.dataclass
class Controller:
    """``max_failures``: how many system failures are retried (-1: any number)."""

    max_failures: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def failed(self, error: BaseException) -> None:
        """Record ``error``; return to retry, or raise when it must surface."""
        if not is_system_failure(error) or self.max_failures == 0:
            raise error  # no retries asked for: the failure itself, as it happened
        self.failures.append(describe(error))
        if self.max_failures != -1 and len(self.failures) > self.max_failures:
            history = "\n".join(f"  {i + 1}. {f}" for i, f in enumerate(self.failures))
            raise FailureLimitExceeded(
                f"the run failed {len(self.failures)} times, more than "
                f"Trainer(max_failures={self.max_failures}) allows:\n{history}\n"
                "Raise max_failures (-1 retries without limit) or fix what kills the workers."
            ) from error
