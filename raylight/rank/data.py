"""Dataloaders on a rank: distributed-sampler injection and batch limits."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from raylight.datamodule import LightningDataModule
from raylight.module import LightningModule
from raylight.rank import hooks
from raylight.shared.config import MisconfigurationException

if TYPE_CHECKING:  # a type only: rank_trainer imports this module
    from raylight.rank.rank_trainer import RankTrainer


class ContiguousSampler(Sampler[int]):
    """Rank r reads one contiguous, unpadded slice of the dataset.

    Used for ``predict``: concatenating the ranks' outputs in rank order gives the
    predictions in dataset order, which Lightning's DDP predict does not.
    """

    def __init__(self, length: int, num_replicas: int, rank: int) -> None:
        per_rank = math.ceil(length / num_replicas)
        self.start = min(length, rank * per_rank)
        self.stop = min(length, self.start + per_rank)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def as_loader_list(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    if isinstance(loaders, Sequence) and not isinstance(loaders, DataLoader):
        return list(loaders)
    return [loaders]


def distribute(
    loader: Any, mode: str, num_replicas: int, rank: int, seed: int, shuffle: bool = True
) -> Any:
    """Give ``loader`` this rank's share of the data, keeping its other arguments.

    ``mode`` is "train" (shuffled DistributedSampler, unless ``shuffle`` is False as with
    ``overfit_batches``), "eval" (unshuffled, padded so every rank runs the same number of
    batches and collectives stay matched) or "predict" (contiguous, unpadded).
    """
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    if isinstance(loader.sampler, DistributedSampler | ContiguousSampler):
        return loader
    if loader.batch_size is None and loader.batch_sampler is not None:
        raise MisconfigurationException(
            "A DataLoader with a custom batch_sampler cannot be split across ranks "
            "automatically: give it a DistributedSampler yourself and set "
            "Trainer(use_distributed_sampler=False)."
        )
    shuffle = shuffle and mode == "train"  # Lightning shuffles distributed training loaders
    if num_replicas == 1:
        # One worker is Lightning's single-device case: the loader's own order. Sequential
        # and random samplers still become a DistributedSampler so that the order is a
        # function of (seed, epoch) and a mid-epoch checkpoint resumes exactly.
        if not isinstance(loader.sampler, SequentialSampler | RandomSampler):
            return loader
        shuffle = shuffle and isinstance(loader.sampler, RandomSampler)
    if mode == "predict":
        sampler: Sampler[int] = ContiguousSampler(len(loader.dataset), num_replicas, rank)
    else:
        sampler = DistributedSampler(
            loader.dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=loader.drop_last if mode == "train" else False,
        )
    distributed = copy.copy(loader)
    # DataLoader forbids re-setting these after __init__; a shallow copy keeps every
    # other argument (workers, collate_fn, pin_memory, generator) exactly as given.
    object.__setattr__(distributed, "sampler", sampler)
    if loader.batch_size is not None:  # batch_size=None: no automatic batching, one sample each
        batch_sampler = BatchSampler(sampler, loader.batch_size, loader.drop_last)
        object.__setattr__(distributed, "batch_sampler", batch_sampler)
    object.__setattr__(distributed, "_iterator", None)
    return distributed


def same_length_on_every_rank(loader: Any) -> bool:
    """Whether ``loader`` gives every rank the same number of batches by construction: a
    DataLoader over a map-style dataset split by a DistributedSampler (or the re-partitioned
    rest of an epoch). Anything else (an IterableDataset, a custom sampler) may not."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return False
    batch_sampler = loader.batch_sampler
    if isinstance(batch_sampler, RemainderBatchSampler):
        return True
    sampler = loader.sampler if batch_sampler is None else getattr(batch_sampler, "sampler", None)
    return isinstance(sampler, DistributedSampler)


def limit_batches(loader: Any, limit: int | float, name: str) -> int:
    """How many batches of ``loader`` a loop runs under ``limit_*_batches``."""
    try:
        available = len(loader)
    except TypeError:
        available = math.inf
    if isinstance(limit, int):
        return int(min(limit, available))
    if available == math.inf:
        if limit == 1.0:
            return math.inf
        raise MisconfigurationException(
            f"{name}={limit} is a fraction, but the loader has no length: use an int."
        )
    batches = int(available * limit)
    if limit > 0.0 and batches == 0 and available > 0:
        raise MisconfigurationException(
            f"{name}={limit} selects 0 of {available} batches: use a larger fraction or an int."
        )
    return batches


class _SkipBatches:
    """A batch sampler without its first ``skip`` batches: indices are drawn, no data loaded."""

    def __init__(self, batch_sampler: Any, skip: int) -> None:
        self.batch_sampler, self.skip = batch_sampler, skip
        self.sampler = getattr(batch_sampler, "sampler", None)

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


def skip_batches(loader: Any, skip: int) -> Any:
    """``loader`` starting at batch ``skip`` of its (already seeded) epoch order."""
    if not skip:
        return loader
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
        resumed = copy.copy(loader)
        object.__setattr__(resumed, "batch_sampler", _SkipBatches(loader.batch_sampler, skip))
        object.__setattr__(resumed, "_iterator", None)
        return resumed
    return itertools.islice(loader, skip, None)  # no batch sampler: read and drop


def set_epoch(loader: Any, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if (
        hasattr(getattr(batch_sampler, "sampler", None), "set_epoch")
        and batch_sampler.sampler is not sampler
    ):
        batch_sampler.sampler.set_epoch(epoch)


# ---- requesting a rank's loaders -----------------------------------------------------------------
_HOOKS = {
    "train": "train_dataloader",
    "val": "val_dataloader",
    "test": "test_dataloader",
    "predict": "predict_dataloader",
}
_LIMITS = {
    "train": "limit_train_batches",
    "val": "limit_val_batches",
    "test": "limit_test_batches",
    "predict": "limit_predict_batches",
}


def is_overridden(obj: Any, name: str) -> bool:
    if obj is None:
        return False
    base = LightningModule if isinstance(obj, LightningModule) else LightningDataModule
    return hooks.overrides(obj, base, name)  # also when set on the object (from_datasets)


def has_source(trainer: RankTrainer, kind: str) -> bool:
    """Whether ``kind`` loaders exist, without calling the hook (Lightning asks it late)."""
    hook = _HOOKS[kind]
    return (
        trainer._loader_sources.get(kind) is not None
        or is_overridden(trainer.datamodule, hook)
        or is_overridden(trainer.lightning_module, hook)
    )


def request_loaders(trainer: RankTrainer, kind: str) -> tuple[list[Any], list[int | float]]:
    """Ask for ``kind`` loaders as Lightning does: given ones, else the datamodule's, else the
    module's hook. Returns the distributed loaders and how many batches each loop runs."""
    loaders = trainer._loader_sources.get(kind)
    hook = _HOOKS[kind]
    if loaders is None and is_overridden(trainer.datamodule, hook):
        loaders = hooks.call_datamodule(trainer, hook)
    elif loaders is None and is_overridden(trainer.lightning_module, hook):
        loaders = hooks.call_module(trainer, hook)
    config = trainer.config
    mode = {"train": "train", "predict": "predict"}.get(kind, "eval")
    loaders = as_loader_list(loaders)
    # Lightning's overfit_batches: the same first batches every epoch, so no shuffling.
    shuffle = not (kind == "train" and config.overfit_batches > 0)
    if not shuffle and any(
        isinstance(getattr(lo, "sampler", None), RandomSampler) for lo in loaders
    ):
        trainer._notice(
            "You requested to overfit but enabled train dataloader shuffling. We are turning "
            "off the train dataloader shuffling for you."
        )
    distributed = [
        distribute(
            lo, mode, trainer.world_size, trainer.global_rank, config.global_seed or 0, shuffle
        )
        if config.use_distributed_sampler
        else lo
        for lo in loaders
    ]
    limit_name = _LIMITS[kind]
    limits = [limit_batches(lo, getattr(config, limit_name), limit_name) for lo in distributed]
    return distributed, limits


# ---- re-partitioning the rest of an epoch over a new world size ----------------------------------
# A DistributedSampler of world size W walks one epoch order P (a permutation of the dataset
# fixed by seed and epoch, padded to a multiple of W) and gives rank r the entries P[r::W].
# Rank r's first k batches of B are P[r + W*j] for j < k*B, so after k batches on every rank
# the ranks together have consumed exactly the prefix P[:k*B*W]: the rest of the epoch is the
# suffix P[k*B*W:], whatever W was. The new world deals that suffix out in chunks of
# W_new*B, each rank taking chunk[r::W_new], so each remaining sample is seen once and
# every rank runs the same number of batches (the last chunk's batches are smaller). After k'
# batches of the new plan the consumed part is again a prefix, k'*B*W_new long, which is what
# a checkpoint taken during this epoch records. One corner: when fewer samples remain in the
# last chunk than there are ranks, that chunk repeats up to W_new - 1 samples from the start of
# the order, because every rank must run the batch (its collectives must match).
def sampler_order_args(loader: Any) -> dict[str, Any] | None:
    """What fixes the epoch order of ``loader``'s DistributedSampler (None: it has none)."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return None
    return {"shuffle": sampler.shuffle, "seed": sampler.seed, "drop_last": sampler.drop_last}


def epoch_order(size: int, epoch: int, world_size: int, order_args: dict[str, Any]) -> list[int]:
    """The unique part of the order a DistributedSampler of ``world_size`` draws for
    ``epoch`` over ``size`` samples."""
    if order_args["shuffle"]:
        generator = torch.Generator().manual_seed(order_args["seed"] + epoch)
        order = torch.randperm(size, generator=generator).tolist()
    else:
        order = list(range(size))
    if order_args["drop_last"] and size % world_size:
        order = order[: (size // world_size) * world_size]  # trimmed instead of padded
    return order


def remaining_after(
    order: list[int], batches_done: int, batch_size: int, world_size: int
) -> list[int]:
    """What is left of ``order`` once every rank of ``world_size`` ran ``batches_done``."""
    return order[batches_done * batch_size * world_size :]


class RemainderBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s batches of the rest of an epoch (see the arithmetic above)."""

    def __init__(self, order: list[int], rank: int, world_size: int, batch_size: int) -> None:
        self.order, self.rank, self.world_size, self.batch_size = (
            order,
            rank,
            world_size,
            batch_size,
        )

    def __len__(self) -> int:
        return -(-len(self.order) // (self.world_size * self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        chunk_size = self.world_size * self.batch_size
        for start in range(0, len(self.order), chunk_size):
            chunk = self.order[start : start + chunk_size]
            if len(chunk) < self.world_size:  # the corner case: every rank needs a sample
                chunk = chunk + self.order[: self.world_size - len(chunk)]
            yield chunk[self.rank :: self.world_size]


def remainder_loader(
    loader: DataLoader, order: list[int], rank: int, world_size: int
) -> DataLoader:
    """``loader`` reading this rank's share of ``order`` (one epoch's remaining samples)."""
    resumed = copy.copy(loader)
    batch_sampler = RemainderBatchSampler(order, rank, world_size, loader.batch_size)
    object.__setattr__(resumed, "batch_sampler", batch_sampler)
    object.__setattr__(resumed, "_iterator", None)
    return resumed


_RAN_OUT = object()


def while_every_rank_has_one(
    trainer: RankTrainer, loader: Any, batches: Iterator[Any], what: str
) -> Iterator[Any]:
    """``batches`` for as long as every rank still has one (beyond Lightning, which hangs).

    A loader whose length differs across ranks (an IterableDataset whose shards are uneven)
    would leave the ranks that still have batches waiting in a collective for the ones that
    ran out. So before each batch the ranks agree, with one one-number all-reduce, that all
    of them have one; the epoch ends on every rank when the first runs out, and rank 0 notes
    which ranks had more. Loaders that are the same length on every rank by construction
    (a DistributedSampler's) are returned as they are: nothing is added to their batches.
    """
    if trainer.world_size == 1 or same_length_on_every_rank(loader):
        return batches
    return _agreed_batches(trainer, batches, what)


def _agreed_batches(trainer: RankTrainer, batches: Iterator[Any], what: str) -> Iterator[Any]:
    count = 0
    while True:
        batch = next(batches, _RAN_OUT)
        have = torch.tensor(0.0 if batch is _RAN_OUT else 1.0, device=trainer.device)
        if trainer._all_reduce(have, "min").item() == 0.0:
            break
        count += 1
        yield batch
    more = torch.tensor(0.0 if batch is _RAN_OUT else 1.0, device=trainer.device)
    ahead = [rank for rank, had in enumerate(trainer._all_gather(more).tolist()) if had]
    if ahead:
        out = [rank for rank in range(trainer.world_size) if rank not in ahead]
        # Once per loop kind: an uneven stream is usually uneven every epoch.
        trainer._notice(
            f"the ranks' {what} loaders gave different numbers of batches (epoch "
            f"{trainer.current_epoch}: rank(s) {out} ran out after {count}, while rank(s) "
            f"{ahead} had more). Every rank ends such an epoch when the first runs out, "
            "instead of waiting for it forever. Give every rank the same number of batches "
            "(shard an IterableDataset evenly by rank), or cap them with limit_*_batches.",
            once=f"uneven {what}",
        )


def limited(loader: Any, limit: int | float) -> Any:
    """The loader's first ``limit`` batches, without starting an extra fetch past them."""
    return loader if limit == math.inf else itertools.islice(loader, int(limit))
