"""LightningDataModule on its own: ``from_datasets`` builds the loaders Lightning's does."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import IterableDataset, RandomSampler, SequentialSampler, TensorDataset

from raylight import LightningDataModule

lightning = pytest.importorskip("pytorch_lightning")


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(6))


def datasets(size: int) -> TensorDataset:
    return TensorDataset(torch.arange(size, dtype=torch.float32).unsqueeze(1))


def shape_of(loader) -> tuple:
    """What distinguishes two loaders built from the same dataset."""
    return (
        type(loader.sampler).__name__,
        loader.batch_size,
        loader.num_workers,
        loader.pin_memory,
        len(loader.dataset),
    )


def test_from_datasets_builds_lightnings_loaders():
    kwargs = dict(
        train_dataset=datasets(10),
        val_dataset=[datasets(4), datasets(6)],
        test_dataset=datasets(3),
        batch_size=4,
        num_workers=0,
    )
    ours = LightningDataModule.from_datasets(**kwargs)
    theirs = lightning.LightningDataModule.from_datasets(**kwargs)
    assert shape_of(ours.train_dataloader()) == shape_of(theirs.train_dataloader())
    assert isinstance(ours.train_dataloader().sampler, RandomSampler)  # training shuffles
    ours_val, theirs_val = ours.val_dataloader(), theirs.val_dataloader()
    assert [shape_of(x) for x in ours_val] == [shape_of(x) for x in theirs_val]
    assert all(isinstance(x.sampler, SequentialSampler) for x in ours_val)
    assert shape_of(ours.test_dataloader()) == shape_of(theirs.test_dataloader())
    with pytest.raises(NotImplementedError):
        ours.predict_dataloader()  # no predict_dataset: the hook stays the class's


def test_from_datasets_keeps_iterable_datasets_in_order_and_maps_by_name():
    dm = LightningDataModule.from_datasets(train_dataset={"a": Stream(), "b": datasets(4)})
    loaders = dm.train_dataloader()
    assert sorted(loaders) == ["a", "b"]
    assert [int(x) for x in loaders["a"]] == list(range(6))  # not shuffled: it cannot be
    assert isinstance(loaders["b"].sampler, RandomSampler)


def test_from_datasets_passes_batch_size_and_num_workers_to_init_when_it_takes_them():
    class Takes(LightningDataModule):
        def __init__(self, batch_size: int, scale: float = 1.0):
            super().__init__()
            self.batch_size, self.scale = batch_size, scale

    class TakesAny(LightningDataModule):
        def __init__(self, **kwargs):
            super().__init__()
            self.kwargs = kwargs

    taken = Takes.from_datasets(train_dataset=datasets(4), batch_size=2, scale=3.0)
    assert (taken.batch_size, taken.scale) == (2, 3.0)
    assert TakesAny.from_datasets(batch_size=5, num_workers=1).kwargs == {
        "batch_size": 5,
        "num_workers": 1,
    }


def test_a_datamodule_from_datasets_pickles_with_its_loaders():
    dm = LightningDataModule.from_datasets(train_dataset=datasets(6), batch_size=3)
    copy = pickle.loads(pickle.dumps(dm))
    assert sum(len(b[0]) for b in copy.train_dataloader()) == 6


@pytest.mark.slow
def test_a_fit_trains_on_a_datamodule_from_datasets(ray_session, tmp_path):
    from models import Classifier, make_dataset

    import raylight as pl

    datamodule = LightningDataModule.from_datasets(
        train_dataset=make_dataset(64), val_dataset=make_dataset(32, seed=1), batch_size=8
    )
    model = Classifier()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 64 // 2 // 8  # each rank reads its half of the shuffled set
    assert "val_loss" in trainer.callback_metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class _Settings(LightningDataModule):
    def __init__(self, data_dir: str = "data", batch_size: int = 8, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore="seed")


def test_a_datamodule_saves_hyperparameters_as_lightnings():
    import pytorch_lightning as lightning

    class Theirs(lightning.LightningDataModule):
        def __init__(self, data_dir: str = "data", batch_size: int = 8, seed: int = 0):
            super().__init__()
            self.save_hyperparameters(ignore="seed")

    ours, theirs = _Settings(batch_size=4), Theirs(batch_size=4)
    assert dict(ours.hparams) == dict(theirs.hparams) == {"data_dir": "data", "batch_size": 4}
    assert ours.hparams.batch_size == 4 and dict(ours.hparams_initial) == dict(ours.hparams)
    assert pickle.loads(pickle.dumps(ours)).hparams == ours.hparams


def test_fit_logs_the_module_and_datamodule_hyperparameters_merged():
    from models import Classifier

    from raylight.driver.logger_relay import hyperparameters
    from raylight.shared.config import MisconfigurationException

    merged = hyperparameters(Classifier(), _Settings())
    assert merged == {"features": 8, "classes": 3, "lr": 0.1, "data_dir": "data", "batch_size": 8}

    class Clashing(LightningDataModule):
        def __init__(self, lr: float = 0.5):
            super().__init__()
            self.save_hyperparameters()

    with pytest.raises(MisconfigurationException, match=r"keys \['lr'\].*different values"):
        hyperparameters(Classifier(), Clashing())
