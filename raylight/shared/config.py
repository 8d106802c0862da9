"""The Trainer's flags, checked once on the driver and shipped to every worker.

Names and defaults are Lightning 2.x's. The scaling flags come in Ray's spelling
(``num_workers``, ``use_gpu``, ``resources_per_worker``) or Lightning's
(``accelerator``, ``devices``, ``num_nodes``); both resolve to the same ``Scaling``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from raylight.shared import storage

_PRECISIONS = {
    "32-true": "32-true",
    "32": "32-true",
    32: "32-true",
    "bf16-mixed": "bf16-mixed",
    "bf16": "bf16-mixed",
    "bf16-true": "bf16-true",  # strategy="fsdp" only: the parameters themselves are bf16
    "16-mixed": "16-mixed",
    "16": "16-mixed",
    16: "16-mixed",
}


NO_TRAIN_LOADER = (
    "No `train_dataloader()` method defined. The Trainer expects as minimum a "
    "`training_step()`, `train_dataloader()` and `configure_optimizers()` to be defined: "
    "define train_dataloader on the datamodule or module, or pass "
    "trainer.fit(model, train_dataloaders=...)."
)


class MisconfigurationException(ValueError):
    """A Trainer flag or a user hook returned something the Trainer cannot use."""


@dataclass(frozen=True)
class Scaling:
    num_workers: int  # the most workers a group has (max of an elastic range)
    use_gpu: bool
    resources_per_worker: dict[str, float]
    min_workers: int = 0  # elastic: a group may start (and go on) with this many; 0 = fixed

    @property
    def elastic(self) -> bool:
        return 0 < self.min_workers < self.num_workers

    @property
    def cpus_per_worker(self) -> int:
        return max(1, int(self.resources_per_worker.get("CPU", 1)))

    def bundle(self) -> dict[str, float]:
        bundle = dict(self.resources_per_worker)
        bundle.setdefault("CPU", 1.0)
        if self.use_gpu:
            bundle.setdefault("GPU", 1.0)
        return bundle


@dataclass
class TrainerConfig:
    max_epochs: int = 1000
    min_epochs: int = 0
    max_steps: int = -1
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    limit_test_batches: int | float = 1.0
    limit_predict_batches: int | float = 1.0
    val_check_interval: int | float = 1.0
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int = 2
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    precision: str = "32-true"
    log_every_n_steps: int = 50
    fast_dev_run: int = 0
    deterministic: bool = False
    default_root_dir: str = field(default_factory=os.getcwd)
    use_distributed_sampler: bool = True
    inference_mode: bool = True
    find_unused_parameters: bool = False
    # DistributedDataParallel's other arguments, from Trainer(strategy=DDPStrategy(...)).
    ddp_kwargs: dict[str, Any] = field(default_factory=dict)
    process_group_timeout_s: float = 1800.0
    # FSDPStrategy's settings (raylight.strategies.fsdp) when the run is sharded, else None.
    fsdp: dict[str, Any] | None = None
    # The most bytes of full weights the driver's model receives after a sharded fit.
    max_driver_weights_bytes: int = 8 * 2**30
    overfit_batches: int | float = 0.0
    reload_dataloaders_every_n_epochs: int = 0
    sync_batchnorm: bool = False
    benchmark: bool | None = None
    detect_anomaly: bool = False
    profiler: str | None = None  # "simple": every rank times its hooks for the driver's table
    barebones: bool = False
    global_seed: int | None = None
    run_id: str = ""  # one fit, across its restarts: tags its checkpoint index entries


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MisconfigurationException(
            f"Trainer({name}={value!r}) is out of range: it takes an int >= {minimum}."
        )
    return value


def _check_limit(name: str, value: Any) -> int | float:
    if isinstance(value, bool):
        raise MisconfigurationException(f"Trainer({name}={value!r}): use an int or a float.")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return value
    raise MisconfigurationException(
        f"Trainer({name}={value!r}) is out of range: it takes a number of batches (int >= 0) "
        "or a fraction of the loader (float in [0.0, 1.0])."
    )


def check_seconds(name: str, value: Any, zero: bool = False) -> float:
    """A duration in seconds: positive, or with ``zero`` also 0 (as often as possible)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or value < 0 or (value == 0 and not zero):
        raise MisconfigurationException(
            f"Trainer({name}={value!r}) is out of range: it takes a number of seconds "
            f"{'>= 0' if zero else '> 0'}."
        )
    return float(value)


_DEVICES_TAKE = (
    "it takes a number of devices (an int >= 1, or a string of one such as '2'), a list of "
    "GPU ids ([0, 1] or '0,1'), -1 or 'auto'"
)


def _count_devices(devices: Any) -> int | None:
    """Lightning's ``devices`` as a count (None: as many as ``num_workers`` says)."""
    if devices in ("auto", -1, "-1", None):
        return None
    given = devices
    if isinstance(devices, str) and "," in devices:  # "0,1": Lightning's GPU-id list
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    if isinstance(devices, list | tuple):
        if not devices or not all(str(d).isdigit() for d in devices):
            raise MisconfigurationException(f"Trainer(devices={given!r}): {_DEVICES_TAKE}.")
        return len(devices)
    if isinstance(devices, str):
        if not devices.strip().isdigit():
            raise MisconfigurationException(f"Trainer(devices={given!r}): {_DEVICES_TAKE}.")
        devices = int(devices)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise MisconfigurationException(f"Trainer(devices={given!r}): {_DEVICES_TAKE}.")
    return devices


def make_config(**flags: Any) -> TrainerConfig:  # noqa: C901 - one check per flag
    """Check every flag and resolve Lightning's special values (None, fast_dev_run)."""
    fast_dev_run = flags.pop("fast_dev_run")
    if isinstance(fast_dev_run, bool):
        fast_dev_run = int(fast_dev_run)
    fast_dev_run = _check_int("fast_dev_run", fast_dev_run or 0, 0)

    max_epochs, max_steps = flags["max_epochs"], flags["max_steps"]
    if max_steps is None:
        max_steps = -1
    _check_int("max_steps", max_steps, -1)
    if max_epochs is None:
        max_epochs = 1000 if max_steps == -1 else -1
    if max_epochs == -1:
        max_epochs = 2**31
    flags["max_epochs"] = _check_int("max_epochs", max_epochs, 0)
    flags["max_steps"] = max_steps
    flags["min_epochs"] = _check_int("min_epochs", flags["min_epochs"] or 0, 0)
    for name in (
        "limit_train_batches",
        "limit_val_batches",
        "limit_test_batches",
        "limit_predict_batches",
    ):
        flags[name] = _check_limit(name, 1.0 if flags[name] is None else flags[name])
    interval = flags["val_check_interval"]
    interval = 1.0 if interval is None else interval
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        raise MisconfigurationException(
            f"Trainer(val_check_interval={interval!r}): it takes a number of batches (int >= 1) "
            "or a fraction of the epoch (float in (0.0, 1.0])."
        )
    if isinstance(interval, float) and not 0.0 < interval <= 1.0:
        raise MisconfigurationException(
            f"Trainer(val_check_interval={interval!r}): a float must be in (0.0, 1.0]."
        )
    if isinstance(interval, int) and not isinstance(interval, bool):
        _check_int("val_check_interval", interval, 1)
    flags["val_check_interval"] = interval
    if flags["check_val_every_n_epoch"] is not None:
        _check_int("check_val_every_n_epoch", flags["check_val_every_n_epoch"], 1)
    flags["num_sanity_val_steps"] = _check_int(
        "num_sanity_val_steps", flags["num_sanity_val_steps"], -1
    )
    _check_int("accumulate_grad_batches", flags["accumulate_grad_batches"], 1)
    _check_int("log_every_n_steps", flags["log_every_n_steps"], 0)  # 0: no step rows
    _check_int("reload_dataloaders_every_n_epochs", flags["reload_dataloaders_every_n_epochs"], 0)
    clip = flags["gradient_clip_val"]
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, int | float) or clip < 0
    ):
        raise MisconfigurationException(
            f"Trainer(gradient_clip_val={clip!r}) is out of range: it takes a number >= 0."
        )
    if flags["gradient_clip_algorithm"] not in (None, "norm", "value"):
        raise MisconfigurationException(
            f"Trainer(gradient_clip_algorithm={flags['gradient_clip_algorithm']!r}): "
            "use 'norm' or 'value'."
        )
    precision = flags["precision"]
    if precision not in _PRECISIONS:
        raise MisconfigurationException(
            f"Trainer(precision={precision!r}) is not supported: use '32-true', 'bf16-mixed', "
            "(on GPU) '16-mixed', or with strategy='fsdp' 'bf16-true'."
        )
    flags["precision"] = _PRECISIONS[precision]

    if fast_dev_run:
        # Lightning: n batches of each loop, one epoch, no sanity check.
        for name in (
            "limit_train_batches",
            "limit_val_batches",
            "limit_test_batches",
            "limit_predict_batches",
        ):
            flags[name] = fast_dev_run
        flags.update(
            max_epochs=1,
            max_steps=fast_dev_run,
            num_sanity_val_steps=0,
            val_check_interval=1.0,
            check_val_every_n_epoch=1,
        )
    root = flags["default_root_dir"] or os.getcwd()
    if not isinstance(root, str | os.PathLike):
        raise MisconfigurationException(
            f"Trainer(default_root_dir={root!r}): it takes a path or a storage URI "
            "(s3://bucket/run, gs://bucket/run), as a str or os.PathLike."
        )
    flags["default_root_dir"] = storage.absolute(os.fspath(root))
    timeout = flags["process_group_timeout_s"]
    check_seconds("process_group_timeout_s", timeout)
    return TrainerConfig(fast_dev_run=fast_dev_run, **flags)


def check_run_flags(
    placement_timeout_s: Any,
    elastic_check_interval: Any,
    max_failures: Any,
    recovery_every_n_train_steps: Any,
    recovery_train_time_interval: Any,
    ray_init_kwargs: Any,
) -> None:
    """The flags of the run on the cluster (raylight's own, beyond Lightning's)."""
    check_seconds("placement_timeout_s", placement_timeout_s)
    check_seconds("elastic_check_interval", elastic_check_interval, zero=True)  # 0: every epoch
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < -1:
        raise MisconfigurationException(
            f"Trainer(max_failures={max_failures!r}): use 0 (no retries), a positive count, "
            "or -1 (retry without limit)."
        )
    if recovery_every_n_train_steps is not None:
        _check_int("recovery_every_n_train_steps", recovery_every_n_train_steps, 1)
    if recovery_train_time_interval is not None and not isinstance(
        recovery_train_time_interval, timedelta
    ):
        raise MisconfigurationException(
            f"Trainer(recovery_train_time_interval={recovery_train_time_interval!r}): it takes "
            "a datetime.timedelta, such as timedelta(minutes=30)."
        )
    if ray_init_kwargs is not None and not isinstance(ray_init_kwargs, dict):
        raise MisconfigurationException(
            f"Trainer(ray_init_kwargs={ray_init_kwargs!r}): it takes a dict of ray.init "
            "arguments, such as {'runtime_env': {...}}."
        )


def make_scaling(  # noqa: C901 - two spellings of the same flags
    num_workers: int | tuple[int, int] | None,
    use_gpu: bool | None,
    resources_per_worker: dict[str, float] | None,
    accelerator: str | None,
    devices: int | str | list[int] | None,
    num_nodes: int,
    gpus: int | None,
) -> Scaling:
    if gpus is not None:
        warnings.warn(
            "Trainer(gpus=N) is deprecated: use Trainer(num_workers=N, use_gpu=True) "
            "or Trainer(accelerator='gpu', devices=N).",
            DeprecationWarning,
            stacklevel=3,
        )
        accelerator, devices = ("gpu", gpus) if gpus else ("cpu", devices)
    if accelerator not in (None, "auto", "cpu", "gpu", "cuda"):
        raise MisconfigurationException(
            f"Trainer(accelerator={accelerator!r}) is not supported: use 'cpu', 'gpu' or 'auto'."
        )
    devices = _count_devices(devices)
    _check_int("num_nodes", num_nodes, 1)
    if devices is not None:
        lightning_workers = devices * num_nodes
        if num_workers is not None and num_workers != lightning_workers:
            raise MisconfigurationException(
                f"Trainer(num_workers={num_workers}) disagrees with devices={devices} x "
                f"num_nodes={num_nodes}: set one spelling only."
            )
        num_workers = lightning_workers
    min_workers = 0
    if isinstance(num_workers, tuple | list):
        if len(num_workers) != 2:
            raise MisconfigurationException(
                f"Trainer(num_workers={num_workers!r}): an elastic range is (min, max)."
            )
        min_workers, num_workers = num_workers
        _check_int("num_workers min", min_workers, 1)
        if not isinstance(num_workers, int) or num_workers < min_workers:
            raise MisconfigurationException(
                f"Trainer(num_workers=({min_workers}, {num_workers!r})): max must be an int >= min."
            )
    num_workers = 1 if num_workers is None else num_workers
    _check_int("num_workers", num_workers, 1)
    if accelerator in ("gpu", "cuda"):
        if use_gpu is False:
            raise MisconfigurationException(
                f"Trainer(accelerator={accelerator!r}) disagrees with use_gpu=False."
            )
        use_gpu = True
    if resources_per_worker is not None and not isinstance(resources_per_worker, dict):
        raise MisconfigurationException(
            f"Trainer(resources_per_worker={resources_per_worker!r}): it takes a dict of Ray "
            "resources per worker, such as {'CPU': 4, 'GPU': 1}."
        )
    if use_gpu not in (None, True, False):
        raise MisconfigurationException(f"Trainer(use_gpu={use_gpu!r}): use True or False.")
    resources = dict(resources_per_worker or {})
    for key, amount in resources.items():
        if not isinstance(amount, int | float) or amount < 0:
            raise MisconfigurationException(
                f"Trainer(resources_per_worker={resources_per_worker!r}): {key!r} must be a "
                "number >= 0."
            )
    if use_gpu is None:
        use_gpu = resources.get("GPU", 0) > 0
    return Scaling(
        num_workers, bool(use_gpu), {k: float(v) for k, v in resources.items()}, min_workers
    )
