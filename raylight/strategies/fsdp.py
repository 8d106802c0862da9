"""Lightning's ``FSDPStrategy``: every rank holds a shard of the parameters, their gradients
and the optimizer state, so a model larger than one device trains across several.

It is built on FSDP2 (``torch.distributed.fsdp.fully_shard``) over a ``DeviceMesh``. Like
``DDPStrategy`` it is a plain description that pickles: the Trainer checks it on the driver
and ships its settings to the ranks, where ``raylight.rank.fsdp`` shards the module.

    from raylight.strategies import FSDPStrategy
    trainer = pl.Trainer(num_workers=4, strategy=FSDPStrategy(auto_wrap_policy={Block}))

Checkpoints are sharded by default: every rank writes its own shards (Lightning's sharded
format, a directory), asynchronously, and a resume at another world size redistributes them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from torch import nn

from raylight.shared.config import MisconfigurationException

# Lightning's (FSDP1) names for what FSDP2 expresses with its mesh and reshard_after_forward.
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
_STATE_DICT_TYPES = ("sharded", "full")
# Lightning's registry names for FSDP.
_FSDP_NAMES: dict[str, dict[str, Any]] = {"fsdp": {}, "fsdp_cpu_offload": {"cpu_offload": True}}
_REFUSED = {
    "accelerator": "pass Trainer(accelerator='cpu' | 'gpu') or Trainer(use_gpu=...) instead",
    "parallel_devices": "use Trainer(num_workers=N), or Trainer(devices=N, num_nodes=M)",
    "cluster_environment": "Ray is the cluster environment; point at a cluster with RAY_ADDRESS",
    "checkpoint_io": "checkpoints go through raylight's storage: use default_root_dir or dirpath",
    "precision_plugin": "use Trainer(precision='32-true' | 'bf16-mixed' | 'bf16-true') instead",
    "process_group_backend": "raylight uses 'gloo' on CPU workers and 'nccl' on GPU workers",
    "device_mesh": "raylight builds the mesh from sharding_strategy and the workers' nodes",
    "mixed_precision": "use Trainer(precision='bf16-mixed' | 'bf16-true' | '16-mixed') instead",
}


class FSDPStrategy:
    """Fully sharded data parallel on every rank, with Lightning's arguments.

    - ``auto_wrap_policy``: module classes (a set, list or tuple) whose instances become FSDP
      units of their own, or Lightning's callable ``policy(module, recurse,
      nonwrapped_numel) -> bool``; None shards the model as one unit.
    - ``activation_checkpointing_policy``: module classes whose activations are recomputed
      in backward instead of stored.
    - ``cpu_offload``: keep the sharded parameters and optimizer state in host memory (GPU
      workers).
    - ``sharding_strategy``: ``"FULL_SHARD"`` (the default), ``"SHARD_GRAD_OP"`` (parameters
      stay gathered between forward and backward), ``"NO_SHARD"`` (replicas, as DDP),
      ``"HYBRID_SHARD"`` (replicas across nodes, shards within one).
    - ``state_dict_type``: ``"sharded"`` (each rank writes its shards) or ``"full"`` (one
      Lightning ``.ckpt``, gathered on rank 0).
    - ``timeout``: bounds the process group's collectives, as for DDPStrategy.

    In ``configure_model`` a module may shard itself by hand with ``fully_shard(...,
    mesh=self.trainer.strategy.device_mesh)``, as under Lightning's ModelParallelStrategy;
    the strategy then shards only the rest.
    """

    def __init__(
        self,
        *,
        auto_wrap_policy: set[type[nn.Module]] | Callable[..., bool] | None = None,
        activation_checkpointing_policy: set[type[nn.Module]] | None = None,
        cpu_offload: bool = False,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "sharded",
        timeout: timedelta | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value in kwargs.items():
            if name in _REFUSED and value is not None:
                raise MisconfigurationException(
                    f"FSDPStrategy({name}=...) is not supported: {_REFUSED[name]}."
                )
            if name not in _REFUSED:
                raise MisconfigurationException(
                    f"FSDPStrategy({name}=...) is not an argument raylight's FSDPStrategy "
                    "takes: check its spelling, or see help(raylight.strategies.FSDPStrategy)."
                )
        # Lightning also takes torch's ShardingStrategy enum (FSDP1's); its names are ours.
        sharding_strategy = getattr(sharding_strategy, "name", sharding_strategy)
        if sharding_strategy not in SHARDING_STRATEGIES:
            raise MisconfigurationException(
                f"FSDPStrategy(sharding_strategy={sharding_strategy!r}): use one of "
                f"{list(SHARDING_STRATEGIES)}."
            )
        if state_dict_type not in _STATE_DICT_TYPES:
            raise MisconfigurationException(
                f"FSDPStrategy(state_dict_type={state_dict_type!r}): use 'sharded' or 'full'."
            )
        if timeout is not None and not isinstance(timeout, timedelta):
            raise MisconfigurationException(
                f"FSDPStrategy(timeout={timeout!r}): it takes a datetime.timedelta."
            )
        self.auto_wrap_policy = _module_classes(auto_wrap_policy, "auto_wrap_policy", True)
        self.activation_checkpointing_policy = _module_classes(
            activation_checkpointing_policy, "activation_checkpointing_policy", False
        )
        self.cpu_offload = bool(cpu_offload)
        self.sharding_strategy = sharding_strategy
        self.state_dict_type = state_dict_type
        self._timeout = timeout

    def __repr__(self) -> str:
        return (
            f"FSDPStrategy(sharding_strategy={self.sharding_strategy!r}, "
            f"state_dict_type={self.state_dict_type!r}, cpu_offload={self.cpu_offload})"
        )

    def settings(self) -> dict[str, Any]:
        """What the ranks need (``Trainer.config.fsdp``)."""
        return {
            "auto_wrap_policy": self.auto_wrap_policy,
            "activation_checkpointing_policy": self.activation_checkpointing_policy,
            "cpu_offload": self.cpu_offload,
            "sharding_strategy": self.sharding_strategy,
            "state_dict_type": self.state_dict_type,
        }


def _module_classes(policy: Any, name: str, callable_allowed: bool) -> Any:
    """A set of nn.Module classes as a tuple (it pickles in a fixed order), or the callable."""
    if policy is None:
        return None
    module_classes = getattr(policy, "_module_classes", None)  # torch's ModuleWrapPolicy
    if module_classes is not None:
        policy = module_classes
    if isinstance(policy, set | frozenset | list | tuple):
        for cls in policy:
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise MisconfigurationException(
                    f"FSDPStrategy({name}=...) holds {cls!r}: it takes nn.Module classes."
                )
        return tuple(sorted(policy, key=lambda c: f"{c.__module__}.{c.__qualname__}"))
    if callable_allowed and callable(policy):
        return policy
    kinds = "a set of nn.Module classes or a callable" if callable_allowed else "a set of classes"
    raise MisconfigurationException(f"FSDPStrategy({name}={policy!r}): it takes {kinds}.")


def is_fsdp(strategy: Any) -> bool:
    """Whether ``Trainer(strategy=...)`` asks for sharded training."""
    return isinstance(strategy, FSDPStrategy) or (
        isinstance(strategy, str) and strategy in _FSDP_NAMES
    )


def fsdp_settings(
    strategy: Any, use_gpu: bool, process_group_timeout_s: float
) -> tuple[dict[str, Any], float]:
    """Check ``Trainer(strategy="fsdp" | FSDPStrategy(...))`` for this run: the ranks'
    settings and the process group's timeout."""
    if isinstance(strategy, str):
        strategy = FSDPStrategy(**_FSDP_NAMES[strategy])
    if strategy.cpu_offload and not use_gpu:
        raise MisconfigurationException(
            "FSDPStrategy(cpu_offload=True) needs GPU workers (on CPU workers everything is in "
            "host memory already): use use_gpu=True, or leave cpu_offload off."
        )
    timeout_s = process_group_timeout_s
    if strategy._timeout is not None:
        timeout_s = strategy._timeout.total_seconds()
        if timeout_s <= 0:
            raise MisconfigurationException(
                f"FSDPStrategy(timeout={strategy._timeout!r}): it must be longer than zero."
            )
    return strategy.settings(), timeout_s


def driver_weights_bytes(max_driver_weights_gb: Any) -> int:
    """``Trainer(max_driver_weights_gb)``: after a sharded fit, whole weights up to this size
    are gathered into the driver's model; larger ones stay in the checkpoints."""
    if isinstance(max_driver_weights_gb, bool) or not (
        isinstance(max_driver_weights_gb, int | float) and max_driver_weights_gb >= 0
    ):
        raise MisconfigurationException(
            f"Trainer(max_driver_weights_gb={max_driver_weights_gb!r}): it takes a number >= 0 "
            "(0 leaves the driver's model as it was after a sharded fit)."
        )
    return int(max_driver_weights_gb * 2**30)
