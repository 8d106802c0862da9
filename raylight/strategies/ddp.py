"""Lightning's ``DDPStrategy``: how every rank wraps the model in DistributedDataParallel.

It is a plain description that pickles. The Trainer checks it on the driver and ships its
settings to the ranks, where ``raylight.rank.strategy`` builds the DDP wrapper from them.
Ray starts the ranks and places them on their devices, so Lightning's arguments about
launching processes and choosing devices have no counterpart here: each is refused with
what to use instead, never ignored.

    from raylight.strategies import DDPStrategy
    trainer = pl.Trainer(num_workers=2, strategy=DDPStrategy(find_unused_parameters=True))
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from typing import Any, NamedTuple

from torch.nn.parallel import DistributedDataParallel

from raylight.shared.config import MisconfigurationException

_NO_COMM_HOOKS = (
    "raylight does not register DDP communication hooks (gradients are all-reduced as they "
    "are); remove it"
)
_SET_BY_RAYLIGHT = "raylight sets it on each rank from Ray's placement; remove it"
_DRIVER_PARAMETERS = (
    "it names parameter tensors of the module on the driver, which the ranks' copies are not; "
    "remove it"
)
# Lightning's arguments (and DistributedDataParallel's) that raylight cannot honour.
_REFUSED = {
    "accelerator": (
        "Ray places each worker on its device: pass Trainer(accelerator='cpu' | 'gpu') or "
        "Trainer(use_gpu=...) instead"
    ),
    "parallel_devices": (
        "Ray places the workers: use Trainer(num_workers=N), or Trainer(devices=N, num_nodes=M)"
    ),
    "cluster_environment": (
        "Ray is the cluster environment (ranks, addresses and ports come from the worker "
        "group): point at a cluster with RAY_ADDRESS or Trainer(ray_init_kwargs=...)"
    ),
    "checkpoint_io": (
        "checkpoints are written through raylight's storage (pyarrow.fs): choose where with "
        "Trainer(default_root_dir=...) or ModelCheckpoint(dirpath=...), a path or s3://, gs://"
    ),
    "precision_plugin": "use Trainer(precision='32-true' | 'bf16-mixed' | '16-mixed') instead",
    "ddp_comm_state": _NO_COMM_HOOKS,
    "ddp_comm_hook": _NO_COMM_HOOKS,
    "ddp_comm_wrapper": _NO_COMM_HOOKS,
    "model_averaging_period": "raylight does not run post-local SGD model averaging; remove it",
    "module": "the Trainer wraps the LightningModule it is given; remove it",
    "device_ids": _SET_BY_RAYLIGHT,
    "output_device": _SET_BY_RAYLIGHT,
    "process_group": "raylight wraps the model with the run's own process group; remove it",
    "device_mesh": "raylight wraps the model with the run's own process group; remove it",
    "delay_all_reduce_named_params": _DRIVER_PARAMETERS,
    "param_to_hook_all_reduce": _DRIVER_PARAMETERS,
}
_START_METHODS = ("popen", "spawn", "fork", "forkserver")
# Trainer(process_group_timeout_s)'s default: Lightning's default_pg_timeout, 30 minutes.
_DEFAULT_TIMEOUT_S = 1800.0
_DDP_ARGUMENTS = frozenset(inspect.signature(DistributedDataParallel.__init__).parameters) - {
    "self"
}


class DDPStrategy:
    """Data parallel on every rank, with Lightning's arguments.

    ``find_unused_parameters``, ``static_graph``, ``gradient_as_bucket_view`` and any other
    keyword of ``torch.nn.parallel.DistributedDataParallel`` (``bucket_cap_mb``,
    ``broadcast_buffers``, ...) go to the ranks' DDP wrapper. ``timeout`` bounds the process
    group's collectives, as ``Trainer(process_group_timeout_s=...)`` does; None keeps the
    Trainer's (30 minutes, Lightning's default). ``process_group_backend`` may name the one
    raylight uses: 'gloo' on CPU workers, 'nccl' on GPU workers. ``start_method`` takes
    Lightning's values, but Ray starts every rank as an actor whichever is named, as for the
    'ddp_spawn' and 'ddp_fork' strategy strings.
    """

    def __init__(
        self,
        *,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
        start_method: str = "popen",
        **ddp_kwargs: Any,
    ) -> None:
        if timeout is not None and not isinstance(timeout, timedelta):
            raise MisconfigurationException(
                f"DDPStrategy(timeout={timeout!r}): it takes a datetime.timedelta, such as "
                "timedelta(minutes=30)."
            )
        if start_method not in _START_METHODS:
            raise MisconfigurationException(
                f"DDPStrategy(start_method={start_method!r}): use one of {list(_START_METHODS)} "
                "(Ray starts every rank as an actor whichever is named)."
            )
        if process_group_backend not in (None, "gloo", "nccl"):
            raise MisconfigurationException(
                f"DDPStrategy(process_group_backend={process_group_backend!r}) is not "
                "supported: raylight uses 'gloo' on CPU workers and 'nccl' on GPU workers."
            )
        # Lightning's attribute names, which some user code reads.
        self._ddp_kwargs: dict[str, Any] = {
            "find_unused_parameters": find_unused_parameters,
            "static_graph": static_graph,
            "gradient_as_bucket_view": gradient_as_bucket_view,
            **_checked_ddp_kwargs(ddp_kwargs),
        }
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._start_method = start_method

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    def __repr__(self) -> str:
        settings = {**self._ddp_kwargs, "process_group_backend": self._process_group_backend}
        if self._timeout is not None:
            settings["timeout"] = self._timeout
        return f"DDPStrategy({', '.join(f'{k}={v!r}' for k, v in settings.items())})"


def _checked_ddp_kwargs(ddp_kwargs: dict[str, Any]) -> dict[str, Any]:
    """DistributedDataParallel's keywords; Lightning's others left at None ask for nothing."""
    checked = {}
    for name, value in ddp_kwargs.items():
        if name in _REFUSED and value is not None:
            raise MisconfigurationException(
                f"DDPStrategy({name}=...) is not supported: {_REFUSED[name]}."
            )
        if name not in _REFUSED and name not in _DDP_ARGUMENTS:
            raise MisconfigurationException(
                f"DDPStrategy({name}=...) is neither an argument of Lightning's DDPStrategy "
                "nor of torch.nn.parallel.DistributedDataParallel: check its spelling."
            )
        if name not in _REFUSED:
            checked[name] = value
    return checked


def _with_start_methods(suffix: str, **settings: Any) -> dict[str, dict[str, Any]]:
    return {
        f"{name}{suffix}": settings for name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
    }


# Lightning's registry names for DDP. Ray starts the ranks whatever the start method named.
_STRATEGY_NAMES: dict[str | None, dict[str, Any]] = {
    None: {},
    "auto": {},
    **_with_start_methods(""),
    **_with_start_methods("_find_unused_parameters_false", find_unused_parameters=False),
    **_with_start_methods("_find_unused_parameters_true", find_unused_parameters=True),
}


class DDPSettings(NamedTuple):
    """What a ``Trainer(strategy=...)`` sets in the run's config."""

    find_unused_parameters: bool
    ddp_kwargs: dict[str, Any]  # DistributedDataParallel's other arguments
    process_group_timeout_s: float


def ddp_settings(strategy: Any, use_gpu: bool, process_group_timeout_s: float) -> DDPSettings:
    """Check ``Trainer(strategy=...)`` (a registry name or a ``DDPStrategy``) for this run."""
    if not isinstance(strategy, DDPStrategy):
        strategy = DDPStrategy(**_named_strategy(strategy))
    backend = "nccl" if use_gpu else "gloo"
    if strategy.process_group_backend not in (None, backend):
        raise MisconfigurationException(
            f"DDPStrategy(process_group_backend={strategy.process_group_backend!r}) does not fit "
            f"this Trainer's {'GPU' if use_gpu else 'CPU'} workers, which use {backend!r}: "
            "remove process_group_backend."
        )
    timeout_s = process_group_timeout_s
    if strategy._timeout is not None:
        timeout_s = strategy._timeout.total_seconds()
        if process_group_timeout_s not in (_DEFAULT_TIMEOUT_S, timeout_s):  # both set, apart
            raise MisconfigurationException(
                f"DDPStrategy(timeout={strategy._timeout!r}) disagrees with "
                f"Trainer(process_group_timeout_s={process_group_timeout_s}): set one only."
            )
        if timeout_s <= 0:
            raise MisconfigurationException(
                f"DDPStrategy(timeout={strategy._timeout!r}): it must be longer than zero."
            )
    ddp_kwargs = dict(strategy._ddp_kwargs)
    find_unused = bool(ddp_kwargs.pop("find_unused_parameters"))
    return DDPSettings(find_unused, ddp_kwargs, timeout_s)


def _named_strategy(name: Any) -> dict[str, Any]:
    if isinstance(name, str | None) and name in _STRATEGY_NAMES:
        return _STRATEGY_NAMES[name]
    names = ", ".join(repr(n) for n in _STRATEGY_NAMES if n)
    if not isinstance(name, str):
        raise MisconfigurationException(
            f"Trainer(strategy={name!r}) is not supported: pass a DDPStrategy or an "
            "FSDPStrategy from raylight.strategies (Lightning's own strategy classes do not run "
            f"on Ray workers), or one of {names}, 'fsdp'."
        )
    raise MisconfigurationException(
        f"Trainer(strategy={name!r}) is not supported: raylight runs DDP or FSDP on Ray "
        "workers; use DDPStrategy(...) or FSDPStrategy(...) from raylight.strategies, or one "
        f"of {names}, 'fsdp'."
    )
