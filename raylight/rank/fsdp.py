"""The strategy seam under sharded training: how a rank runs one step with FSDP2.

Every rank holds a shard of each parameter (a ``DTensor`` over the run's ``DeviceMesh``),
of its gradient and of the optimizer state. ``fully_shard`` gathers a unit's parameters
just before its forward and backward and frees them after, and reduce-scatters the
gradients. The training step, like DDP's, runs inside the root unit's forward (the
``_StepModule`` below), so the parameters the module owns directly are gathered for it;
validation, test and predict steps go through that forward too.

The methods are ``strategy.py``'s (the loops call them the same way); what differs is the
wrapping, gradient sync during accumulation, and the state dicts, which travel as shards
(``torch.distributed.checkpoint.state_dict``) instead of whole tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from raylight.rank import hooks
from raylight.rank.strategy import Precision, StrategyCommon
from raylight.shared import sharded

if TYPE_CHECKING:  # types only: rank_trainer builds the strategy
    from raylight.module import LightningModule
    from raylight.rank.rank_trainer import RankTrainer

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class _StepModule(nn.Module):
    """The root FSDP unit: its forward runs one of the module's step methods, so that every
    parameter the module owns directly is gathered for that step and freed after it."""

    def __init__(self, module: LightningModule, trainer: RankTrainer) -> None:
        super().__init__()
        self.module = module
        self._trainer = trainer

    def forward(self, step_name: str, *args: Any) -> Any:
        return hooks.call_module(self._trainer, step_name, *args)


class FSDPStrategy(StrategyCommon):
    """Fully sharded data parallel on FSDP2; ``settings`` come from the driver's
    ``raylight.strategies.FSDPStrategy``."""

    sharded_checkpoints: bool

    def __init__(
        self, trainer: RankTrainer, precision: str, device: torch.device, settings: dict[str, Any]
    ) -> None:
        self._trainer = trainer
        self.settings = settings
        self.sharded_checkpoints = settings["state_dict_type"] == "sharded"
        # bf16-mixed: autocast as under DDP, with gradients reduced in bf16 (Lightning's
        # FSDP precision); bf16-true: the module itself is bf16.
        self.precision = Precision("32-true" if precision == "bf16-true" else precision, device)
        self._precision_name = precision
        self._true_dtype = torch.bfloat16 if precision == "bf16-true" else None
        self._mesh: DeviceMesh | None = None
        self.model: Any = None  # the root FSDP unit, once set up
        self._checkpoint_group: Any = None  # asynchronous saves' own collectives
        self._pending_save: Any = None  # the last asynchronous save's future
        self._in_manual_step = False  # inside a manual-optimization training_step

    # ---- Lightning's trainer.strategy ------------------------------------------------------
    @property
    def device_mesh(self) -> DeviceMesh:
        """The mesh the module is sharded over: 1-D (``"shard"``), or 2-D (``"replicate"``,
        ``"shard"``) for HYBRID_SHARD (nodes by ranks within one) and NO_SHARD."""
        if self._mesh is None:
            self._mesh = _build_mesh(self._trainer, self.settings["sharding_strategy"])
        return self._mesh

    # ---- the step ------------------------------------------------------------------------------
    def place(self, module: LightningModule, fitting: bool) -> None:
        """The module moves shard by shard as it is sharded, so a model larger than one device
        never sits whole on it: a fit shards it in ``setup_module``; a validate, test or
        predict call of its own (which builds no optimizer) is sharded here."""
        if not fitting:
            self.setup_module(module, find_unused_parameters=False)

    def setup_module(self, module: LightningModule, find_unused_parameters: bool) -> None:
        """Shard ``module``: the auto-wrap units first (innermost first), then the root."""
        device = self._trainer.device
        if self._true_dtype is not None:
            module.to(self._true_dtype)
        _checkpoint_activations(module, self.settings["activation_checkpointing_policy"])
        options: dict[str, Any] = {
            "mesh": self.device_mesh,
            "reshard_after_forward": self.settings["sharding_strategy"] != "SHARD_GRAD_OP",
            "mp_policy": _mixed_precision(self._precision_name),
        }
        if self.settings["cpu_offload"]:
            options["offload_policy"] = CPUOffloadPolicy()
        for unit in _units(module, self.settings["auto_wrap_policy"]):
            fully_shard(unit, **options)
        self.model = fully_shard(_StepModule(module, self._trainer), **options)
        if device.type != "cpu":
            module.to(device)  # buffers and anything fully_shard left where it was
        if self._checkpoint_group is None and self.sharded_checkpoints:
            # Asynchronous saves coordinate on their own group: their collectives run on a
            # background thread, beside the training step's on the default group.
            self._checkpoint_group = dist.new_group(backend="gloo")

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self._in_manual_step = not self._trainer.lightning_module.automatic_optimization
        try:
            with self.precision.autocast():
                return self.model("training_step", batch, batch_idx)
        finally:
            self._in_manual_step = False

    def evaluation_context(self) -> contextlib.AbstractContextManager[Any]:
        """no_grad whatever ``Trainer(inference_mode)`` says: FSDP gathers parameters into
        buffers it reuses in training, which must not become inference tensors."""
        return torch.no_grad()

    def evaluation_step(self, step_name: str, *args: Any) -> Any:
        """A validation, test or predict step, through the root unit."""
        with self.precision.autocast():
            return self.model(step_name, *args)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradients accumulate unsharded on each rank; they reduce-scatter on a window's last
        batch."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        trainer = self._trainer
        manual = self._in_manual_step and loss.requires_grad
        if manual:
            # manual_backward runs inside the root unit's forward, before FSDP has hooked
            # the step's output for backward. Hook the loss as FSDP hooks a unit's outputs
            # (torch's FSDPState._pre_backward), so that this backward ends in FSDP's final
            # callback: the root's gradients are reduce-scattered, its parameters resharded.
            loss.register_hook(self.model._get_fsdp_state()._pre_backward)
        hooks.call(trainer, "on_before_backward", loss)
        hooks.call_module(trainer, "backward", self.precision.scale(loss), *args, **kwargs)
        hooks.call(trainer, "on_after_backward")
        if manual:
            self.model.unshard()  # the root's parameters again, for the rest of the step

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, **kwargs)
        if self._in_manual_step:
            # Gathered parameters are copies of the shards: free every unit's (under
            # SHARD_GRAD_OP inner units stay gathered after their forward), and gather the
            # root's stepped ones again for a forward later in this step.
            for unit in self.model.modules():
                if isinstance(unit, FSDPModule):
                    unit.reshard()
            self.model.unshard()
        return output

    def after_manual_step(self) -> None:
        """Nothing to re-arm: FSDP keeps no per-forward sync state between steps."""

    # ---- state dicts ---------------------------------------------------------------------------
    def model_state_dict(self, shards: bool = False) -> dict[str, Any]:
        """Shards (DTensors) for a sharded checkpoint, or with ``shards`` (no collective);
        else whole CPU tensors on rank 0 (and an empty dict on the others), gathered one
        tensor at a time."""
        module = self._trainer.lightning_module
        if shards or self.sharded_checkpoints:
            return get_model_state_dict(module)
        return get_model_state_dict(module, options=_FULL)

    def optimizer_state_dicts(self, shards: bool = False) -> list[dict[str, Any]]:
        module = self._trainer.lightning_module
        options = None if shards or self.sharded_checkpoints else _FULL
        return [
            get_optimizer_state_dict(module, optimizer, options=options)
            for optimizer in self._trainer.optimizers
        ]

    def load_model_state_dict(
        self, state_dict: dict[str, Any], filepath: str, strict: bool
    ) -> None:
        """Shards from a sharded checkpoint, or whole tensors (a ``.ckpt``) that every rank
        read: each rank keeps its own shard of them."""
        full = not any(isinstance(v, DTensor) for v in state_dict.values())
        set_model_state_dict(
            self._trainer.lightning_module,
            state_dict,
            options=StateDictOptions(full_state_dict=full, strict=strict),
        )

    def load_optimizer_state_dicts(self, states: list[dict[str, Any]]) -> None:
        module = self._trainer.lightning_module
        for optimizer, state in zip(self._trainer.optimizers, states, strict=False):
            state = _keyed_by_name(module, optimizer, state)
            full = _holds_whole_tensors(state)
            set_optimizer_state_dict(
                module, optimizer, state, options=StateDictOptions(full_state_dict=full)
            )

    def read_sharded(self, filepath: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """This rank's shards of a sharded checkpoint, redistributed over the current mesh
        (the world may be another size than the one that saved it)."""
        module = self._trainer.lightning_module
        state: dict[str, Any] = {"model": get_model_state_dict(module)}
        for index, optimizer in enumerate(self._trainer.optimizers):
            state[f"optimizer_{index}"] = get_optimizer_state_dict(module, optimizer)
        dcp.load(
            state,
            storage_reader=sharded.storage_reader(filepath),
            planner=sharded.load_planner(),
        )
        optimizers = [state[f"optimizer_{i}"] for i in range(len(self._trainer.optimizers))]
        return state["model"], optimizers

    def save_sharded(self, tensors: dict[str, Any], filepath: str) -> Any:
        """Start writing this rank's shards; returns once they are copied to host memory.
        One save at a time: the previous one finishes first."""
        self.wait_for_save()
        self._pending_save = dcp.async_save(
            tensors,
            storage_writer=sharded.storage_writer(filepath),
            process_group=self._checkpoint_group,
            async_stager=_HostCopy(),
        )
        return self._pending_save

    def wait_for_save(self) -> None:
        if self._pending_save is not None:
            pending, self._pending_save = self._pending_save, None
            pending.result()

    def final_weights(self) -> dict[str, Any] | None:
        """The whole weights on rank 0 for the driver's model, or None on every rank when they
        exceed ``Trainer(max_driver_weights_gb)`` (the driver then keeps its model as it was)."""
        module = self._trainer.lightning_module
        size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        if size > self._trainer.config.max_driver_weights_bytes:
            return None
        return get_model_state_dict(module, options=_FULL)


class _HostCopy:
    """DCP's stager (its ``AsyncStager`` protocol) that copies each tensor's local data to
    host memory and nothing else. DCP's default deep-copies every DTensor object on CPU, which
    took over 10 times the copy itself; the spec (mesh, placements, shape) is immutable, so
    the copies share it."""

    should_synchronize_after_execute = False

    def stage(self, state: Any) -> Any:
        return _host_copy(state)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _host_copy(state: Any) -> Any:
    if isinstance(state, DTensor):
        local = state._local_tensor.detach().to("cpu", copy=True)
        return DTensor(local, state._spec, requires_grad=False)
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: _host_copy(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_host_copy(value) for value in state)
    return state


def _holds_whole_tensors(state: dict[str, Any]) -> bool:
    """Whether an optimizer state holds whole tensors (from a ``.ckpt``) rather than this
    rank's shards. One with no tensors but scalars (SGD without momentum holds none) loads
    as it is."""
    tensors = [v for s in state.get("state", {}).values() for v in s.values()]
    return any(
        isinstance(v, torch.Tensor) and v.dim() > 0 and not isinstance(v, DTensor) for v in tensors
    )


def _keyed_by_name(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """``Optimizer.state_dict()``'s form (parameters numbered in the optimizer's order, as DDP
    and pytorch-lightning's DDP save them) as ``get_optimizer_state_dict``'s (parameters named
    by FQN); a state already keyed by name as it is."""
    groups = state.get("param_groups", [])
    if not any(isinstance(p, int) for group in groups for p in group["params"]):
        return state
    names = {id(p): name for name, p in module.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_layout = [len(group["params"]) for group in groups]
    layout = [len(group["params"]) for group in optimizer.param_groups]
    if saved_layout != layout:
        raise ValueError(
            f"The checkpoint's optimizer state holds {sum(saved_layout)} parameters in groups "
            f"of {saved_layout}; this run's optimizer has {sum(layout)} in groups of {layout}. "
            "Resume with the configure_optimizers the checkpoint was saved with."
        )
    return {
        "state": {ordered[i]: value for i, value in state.get("state", {}).items()},
        "param_groups": [
            {**group, "params": [ordered[i] for i in group["params"]]} for group in groups
        ],
    }


def _build_mesh(trainer: RankTrainer, sharding_strategy: str) -> DeviceMesh:
    world = trainer.world_size
    device_type = trainer.device.type
    if sharding_strategy == "NO_SHARD":
        return init_device_mesh(device_type, (world, 1), mesh_dim_names=("replicate", "shard"))
    if sharding_strategy == "HYBRID_SHARD":
        nodes = trainer.num_nodes
        if world % nodes:
            raise RuntimeError(
                f"HYBRID_SHARD needs the same number of ranks on every node; this run has "
                f"{world} ranks on {nodes} nodes. Use sharding_strategy='FULL_SHARD', or give "
                "each node the same number of workers."
            )
        return init_device_mesh(
            device_type, (nodes, world // nodes), mesh_dim_names=("replicate", "shard")
        )
    return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))


def _mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """Lightning's FSDP mixed precision: parameters stay float32 (autocast casts the
    compute), gradients reduce in the half type. bf16-true: the module is bf16 already; the
    root unit casts the batch's floating tensors to it."""
    if precision == "bf16-true":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)
    if precision == "16-mixed":
        return MixedPrecisionPolicy(reduce_dtype=torch.float16)
    return MixedPrecisionPolicy()


def _units(module: nn.Module, policy: Any) -> list[nn.Module]:
    """The submodules the policy makes FSDP units, innermost first (fully_shard needs the
    children sharded before their parents), skipping any the user sharded already."""
    if policy is None:
        return []
    chosen = []
    for submodule in module.modules():
        if submodule is module or isinstance(submodule, FSDPModule):
            continue
        if isinstance(policy, tuple):
            wanted = isinstance(submodule, policy)
        else:  # Lightning's callable: policy(module, recurse, nonwrapped_numel)
            numel = sum(p.numel() for p in submodule.parameters())
            wanted = bool(policy(module=submodule, recurse=False, nonwrapped_numel=numel))
        if wanted:
            chosen.append(submodule)
    return list(reversed(chosen))


def _checkpoint_activations(module: nn.Module, classes: tuple[type[nn.Module], ...] | None) -> None:
    """Recompute these submodules' activations in backward (torch's composable checkpoint,
    which keeps the parameter names, so checkpoints do not change)."""
    if not classes:
        return
    from torch.distributed._composable import checkpoint

    for submodule in module.modules():
        if submodule is not module and isinstance(submodule, classes):
            checkpoint(submodule)
