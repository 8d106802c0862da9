"""Dataloaders on a rank: ``distribute``, ``limit_batches``, ``set_epoch``."""

import math

import pytest
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Sampler,
    SequentialSampler,
)

from raylight.rank.data import (
    ContiguousSampler,
    as_loader_list,
    distribute,
    limit_batches,
    set_epoch,
)
from raylight.shared.config import MisconfigurationException


class Range(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(10))


def collate_times_ten(items):
    return torch.tensor(items) * 10


class PairsBatchSampler(Sampler[list[int]]):
    """A user batch sampler that is not a torch BatchSampler."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter([[i, i + 1] for i in range(0, self.n - 1, 2)])

    def __len__(self):
        return self.n // 2


def make_loader(n=20, **kwargs):
    defaults = {
        "batch_size": 4,
        "num_workers": 0,
        "drop_last": True,
        "collate_fn": collate_times_ten,
        "pin_memory": False,
    }
    defaults.update(kwargs)
    return DataLoader(Range(n), **defaults)


def indices(loader):
    """Dataset indices a loader yields, through its batches (undoing collate_times_ten)."""
    return [int(x) // 10 for batch in loader for x in batch]


# ---- distribute: sampler injection --------------------------------------------------------------


@pytest.mark.parametrize(("mode", "shuffle"), [("train", True), ("eval", False)])
def test_distribute_keeps_loader_arguments_and_injects_distributed_sampler(mode, shuffle):
    loader = make_loader()
    original_sampler = loader.sampler
    out = distribute(loader, mode, num_replicas=2, rank=1, seed=123)

    assert out is not loader
    assert out.batch_size == 4
    assert out.num_workers == 0
    assert out.drop_last is True
    assert out.collate_fn is collate_times_ten
    assert out.pin_memory is False
    assert out.dataset is loader.dataset

    assert isinstance(out.sampler, DistributedSampler)
    assert out.sampler.shuffle is shuffle
    assert out.sampler.num_replicas == 2
    assert out.sampler.rank == 1
    assert out.sampler.seed == 123
    assert out.batch_sampler.sampler is out.sampler
    assert out.batch_sampler.batch_size == 4
    assert out.batch_sampler.drop_last is True

    # the user's loader is left as it was
    assert loader.sampler is original_sampler
    assert isinstance(loader.sampler, SequentialSampler)

    # batches still go through the user's collate_fn
    batches = list(out)
    assert len(batches) == len(out) == 2  # 10 indices per rank, batches of 4, drop_last
    assert all(batch.shape == (4,) for batch in batches)
    assert all(int(x) % 10 == 0 for batch in batches for x in batch)


def test_train_sampler_is_shuffled_and_eval_sampler_is_not():
    loader = make_loader(n=40, drop_last=False)
    train = distribute(loader, "train", 2, 0, seed=0)
    evaluation = distribute(loader, "eval", 2, 0, seed=0)
    assert list(evaluation.sampler) == list(range(0, 40, 2))
    assert sorted(train.sampler) != list(train.sampler)  # shuffled
    assert len(list(train.sampler)) == 20


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_two_ranks_cover_the_dataset(mode):
    loader = make_loader(n=10, drop_last=False)
    ranks = [distribute(loader, mode, 2, rank, seed=7) for rank in range(2)]
    seen = [indices(rank_loader) for rank_loader in ranks]
    assert len(seen[0]) == len(seen[1]) == 5
    assert set(seen[0]) | set(seen[1]) == set(range(10))
    assert not set(seen[0]) & set(seen[1])


def test_eval_pads_so_every_rank_runs_the_same_number_of_batches():
    loader = make_loader(n=10, batch_size=2, drop_last=False)
    ranks = [distribute(loader, "eval", 3, rank, seed=0) for rank in range(3)]
    seen = [indices(rank_loader) for rank_loader in ranks]
    assert [len(s) for s in seen] == [4, 4, 4]
    assert set().union(*seen) == set(range(10))
    assert [len(rank_loader) for rank_loader in ranks] == [2, 2, 2]


def test_train_ranks_use_the_same_permutation():
    loader = make_loader(n=16, drop_last=False)
    ranks = [distribute(loader, "train", 2, rank, seed=3) for rank in range(2)]
    seen = [list(rank_loader.sampler) for rank_loader in ranks]
    assert sorted(seen[0] + seen[1]) == list(range(16))


@pytest.mark.parametrize(("n", "replicas"), [(10, 3), (10, 2), (7, 4), (2, 4), (9, 1)])
def test_predict_gives_contiguous_unpadded_slices_in_rank_order(n, replicas):
    loader = make_loader(n=n, batch_size=3, drop_last=False, shuffle=True)
    ranks = [distribute(loader, "predict", replicas, rank, seed=0) for rank in range(replicas)]
    for rank_loader in ranks:
        assert isinstance(rank_loader.sampler, ContiguousSampler)
    per_rank = [indices(rank_loader) for rank_loader in ranks]
    for part in per_rank:
        if part:  # a rank past the end of a short dataset gets nothing
            assert part == list(range(part[0], part[-1] + 1))
    concatenated = [i for part in per_rank for i in part]
    assert concatenated == list(range(n))


def test_iterable_dataset_loader_is_returned_unchanged():
    loader = DataLoader(Stream(), batch_size=4)
    for mode in ("train", "eval", "predict"):
        assert distribute(loader, mode, 2, 0, seed=0) is loader


def test_non_dataloader_is_returned_unchanged():
    batches = [torch.zeros(2), torch.ones(2)]
    assert distribute(batches, "train", 2, 0, seed=0) is batches


def test_loader_with_a_distributed_sampler_is_returned_unchanged():
    dataset = Range(10)
    loader = DataLoader(dataset, sampler=DistributedSampler(dataset, num_replicas=2, rank=0))
    assert distribute(loader, "train", 2, 0, seed=0) is loader


def test_custom_batch_sampler_raises_pointing_at_use_distributed_sampler():
    loader = DataLoader(Range(10), batch_sampler=PairsBatchSampler(10))
    with pytest.raises(MisconfigurationException, match="use_distributed_sampler=False"):
        distribute(loader, "train", 2, 0, seed=0)


def test_loader_without_automatic_batching_is_split():
    # DataLoader(batch_size=None) yields one dataset item at a time (no batch sampler).
    # Lightning injects a DistributedSampler as `sampler` for such a loader.
    loader = DataLoader(Range(10), batch_size=None)
    ranks = [distribute(loader, "eval", 2, rank, seed=0) for rank in range(2)]
    seen = [[int(item) for item in rank_loader] for rank_loader in ranks]
    assert [len(s) for s in seen] == [5, 5]
    assert set(seen[0]) | set(seen[1]) == set(range(10))


# ---- limit_batches -----------------------------------------------------------------------------------


@pytest.fixture
def ten_batches():
    loader = DataLoader(Range(40), batch_size=4)
    assert len(loader) == 10
    return loader


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(3, 3), (10, 10), (25, 10), (0, 0), (1.0, 10), (0.5, 5), (0.25, 2), (0.1, 1), (0.0, 0)],
)
def test_limit_batches(ten_batches, limit, expected):
    result = limit_batches(ten_batches, limit, "limit_train_batches")
    assert result == expected
    assert isinstance(result, int)


def test_fraction_selecting_no_batch_raises(ten_batches):
    with pytest.raises(MisconfigurationException, match="limit_val_batches"):
        limit_batches(ten_batches, 0.05, "limit_val_batches")


def test_limit_on_an_empty_loader_is_zero():
    empty = DataLoader(Range(0), batch_size=4)
    assert limit_batches(empty, 0.5, "limit_train_batches") == 0


def test_limit_on_a_loader_without_length():
    loader = DataLoader(Stream(), batch_size=4)
    assert limit_batches(loader, 1.0, "limit_train_batches") == math.inf
    assert limit_batches(loader, 5, "limit_train_batches") == 5
    with pytest.raises(MisconfigurationException, match="limit_train_batches"):
        limit_batches(loader, 0.5, "limit_train_batches")


# ---- set_epoch ------------------------------------------------------------------------------------


def test_set_epoch_reaches_the_distributed_sampler():
    loader = distribute(make_loader(n=32, drop_last=False), "train", 2, 0, seed=0)
    first = list(loader.sampler)
    set_epoch(loader, 3)
    assert loader.sampler.epoch == 3
    assert list(loader.sampler) != first  # a new shuffle
    set_epoch(loader, 0)
    assert list(loader.sampler) == first  # reproducible per epoch


def test_set_epoch_on_a_user_batch_sampler_sampler():
    dataset = Range(12)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0)
    loader = DataLoader(dataset, batch_sampler=torch.utils.data.BatchSampler(sampler, 2, False))
    set_epoch(loader, 5)
    assert sampler.epoch == 5


def test_set_epoch_without_a_distributed_sampler_is_harmless():
    loader = make_loader()
    set_epoch(loader, 4)
    assert isinstance(loader.sampler, SequentialSampler)
    set_epoch([torch.zeros(1)], 1)


# ---- as_loader_list -----------------------------------------------------------------------------


def test_as_loader_list():
    a, b = make_loader(), make_loader()
    assert as_loader_list(None) == []
    assert as_loader_list(a) == [a]
    assert as_loader_list([a, b]) == [a, b]
    assert as_loader_list({"x": a, "y": b}) == [a, b]


class UnevenShards(IterableDataset):
    """Each rank reads its own shard, and the shards differ: ``sizes[rank]`` samples."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def __iter__(self):
        import torch.distributed as dist

        rank = dist.get_rank()
        generator = torch.Generator().manual_seed(rank)
        for index in range(self.sizes[rank]):
            yield torch.randn(8, generator=generator), index % 3


@pytest.mark.slow
def test_uneven_iterable_shards_end_the_epoch_on_every_rank_when_the_first_runs_out(
    ray_session, tmp_path
):
    import time
    import warnings

    from models import Classifier

    import raylight as pl
    from raylight.shared import checkpoint

    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=2,
        process_group_timeout_s=60,  # were the ranks to wait for each other: fail, not hang
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(
            Classifier(),
            DataLoader(UnevenShards([24, 16]), batch_size=8),  # rank 0: 3 batches, rank 1: 2
            DataLoader(UnevenShards([8, 16]), batch_size=8),  # rank 0: 1, rank 1: 2
        )
    assert time.monotonic() - started < 60
    assert trainer.global_step == 4  # 2 batches per epoch on every rank, 2 epochs
    uneven = [str(w.message) for w in caught if "different numbers of batches" in str(w.message)]
    # One warning per loop kind, though every epoch (and the sanity check) was uneven.
    assert len(uneven) == 2, uneven
    assert (
        "the ranks' train loaders gave different numbers of batches (epoch 0: rank(s) [1] "
        "ran out after 2, while rank(s) [0] had more)" in "\n".join(uneven)
    )
    assert (
        "the ranks' validation loaders gave different numbers of batches (epoch 0: rank(s) "
        "[0] ran out after 1, while rank(s) [1] had more)" in "\n".join(uneven)
    )
    # The epoch ended by running out: a checkpoint taken now resumes at the next epoch.
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    position = checkpoint.load(str(tmp_path / "end.ckpt"))["raylight"]
    assert (position["next_epoch"], position["batches_done"]) == (2, 0)
