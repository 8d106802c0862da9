"""Run code on global rank 0 only, as ``pytorch_lightning.utilities.rank_zero`` does.

``rank_zero_only.rank`` is the process's global rank. It starts from the environment
(``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``, ``JSM_NAMESPACE_RANK``, else 0: the driver),
and every raylight worker sets it to its rank when it joins the process group, before any
user code runs there. This is the one module-level mutable state in raylight: Lightning's
API is a function attribute, and user code reads it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def rank_zero_only(fn: Callable[..., T], default: T | None = None) -> Callable[..., T | None]:
    """Wrap ``fn`` to run only on global rank 0; other ranks get ``default``."""

    @wraps(fn)
    def wrapped_fn(*args: Any, **kwargs: Any) -> T | None:
        rank = getattr(rank_zero_only, "rank", None)
        if rank is None:
            raise RuntimeError("The `rank_zero_only.rank` needs to be set before use")
        if rank == 0:
            return fn(*args, **kwargs)
        return default

    return wrapped_fn


def _rank_from_env() -> int | None:
    # LOCAL_RANK before SLURM_PROCID: SLURM sets the latter even when it does not launch ranks.
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        rank = os.environ.get(key)
        if rank is not None:
            return int(rank)
    return None


rank_zero_only.rank = getattr(rank_zero_only, "rank", _rank_from_env() or 0)  # type: ignore[attr-defined]


def set_rank(rank: int) -> None:
    """Make ``rank`` this process's global rank for raylight's ``rank_zero_only`` and, when
    it is installed, for Lightning's (``lightning_utilities``), so that modules written
    against either behave on a worker as on a Lightning rank."""
    rank_zero_only.rank = rank  # type: ignore[attr-defined]
    try:
        from lightning_utilities.core import rank_zero as lightning_rank_zero
    except ImportError:  # Lightning's helpers are not installed: nothing else to set
        return
    lightning_rank_zero.rank_zero_only.rank = rank


@rank_zero_only
def rank_zero_debug(*args: Any, stacklevel: int = 4, **kwargs: Any) -> None:
    """Log at debug level on global rank 0 only."""
    log.debug(*args, stacklevel=stacklevel, **kwargs)


@rank_zero_only
def rank_zero_info(*args: Any, stacklevel: int = 4, **kwargs: Any) -> None:
    """Log at info level on global rank 0 only."""
    log.info(*args, stacklevel=stacklevel, **kwargs)


@rank_zero_only
def rank_zero_warn(message: str | Warning, stacklevel: int = 4, **kwargs: Any) -> None:
    """Warn on global rank 0 only."""
    warnings.warn(message, stacklevel=stacklevel, **kwargs)


def rank_zero_deprecation(message: str | Warning, stacklevel: int = 5, **kwargs: Any) -> None:
    """A deprecation warning on global rank 0 only."""
    category = kwargs.pop("category", DeprecationWarning)
    rank_zero_warn(message, stacklevel=stacklevel, category=category, **kwargs)
