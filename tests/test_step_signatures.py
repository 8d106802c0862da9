"""Step methods with Lightning's optional arguments, on two workers and in pytorch-lightning.

Each step writes what it received (the batch's size and the arguments after it) to a file
per rank. Two raylight workers each read half of a loader; pytorch-lightning on one CPU
device reads a loader of that half's size, so every rank must record exactly what
pytorch-lightning's one process records.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from models import loader, make_dataset

import raylight as pl

lightning = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.slow

BATCH = 8


class Recorder:
    """The module's body; a step class adds its steps and a LightningModule base."""

    def __init__(self, record_dir: str) -> None:
        super().__init__()
        self.record_dir = record_dir
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(8, 3)

    def record(self, hook: str, batch, rest: tuple) -> torch.Tensor:
        path = os.path.join(self.record_dir, f"rank{self.global_rank}.jsonl")
        with open(path, "a") as file:
            file.write(json.dumps([hook, len(batch[0]), list(rest)]) + "\n")
        return F.cross_entropy(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TakesBatch(Recorder):
    def training_step(self, batch):
        return self.record("training_step", batch, ())

    def validation_step(self, batch):
        self.record("validation_step", batch, ())

    def test_step(self, batch):
        self.record("test_step", batch, ())

    def predict_step(self, batch):
        self.record("predict_step", batch, ())


class TakesBatchIdx(Recorder):
    def training_step(self, batch, batch_idx):
        return self.record("training_step", batch, (batch_idx,))

    def validation_step(self, batch, batch_idx):
        self.record("validation_step", batch, (batch_idx,))

    def test_step(self, batch, batch_idx):
        self.record("test_step", batch, (batch_idx,))

    def predict_step(self, batch, batch_idx):
        self.record("predict_step", batch, (batch_idx,))


class TakesArgs(Recorder):
    def training_step(self, batch, *args):
        return self.record("training_step", batch, args)

    def validation_step(self, batch, *args):
        self.record("validation_step", batch, args)

    def test_step(self, batch, *args):
        self.record("test_step", batch, args)

    def predict_step(self, batch, *args):
        self.record("predict_step", batch, args)


class TakesDataloaderIdx(Recorder):
    def training_step(self, batch, batch_idx):
        return self.record("training_step", batch, (batch_idx,))

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.record("validation_step", batch, (batch_idx, dataloader_idx))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        self.record("predict_step", batch, (batch_idx, dataloader_idx))


class TakesNoDataloaderIdx(TakesDataloaderIdx):
    def validation_step(self, batch, batch_idx):
        self.record("validation_step", batch, (batch_idx,))


class RequiresDataloaderIdx(TakesDataloaderIdx):
    def validation_step(self, batch, batch_idx, dataloader_idx):
        self.record("validation_step", batch, (batch_idx, dataloader_idx))


def _classes(body: type) -> tuple[type, type]:
    """The same module for raylight and for pytorch-lightning (importable on the workers)."""
    return globals()[f"Ray{body.__name__}"], globals()[f"Lightning{body.__name__}"]


for _body in (
    TakesBatch,
    TakesBatchIdx,
    TakesArgs,
    TakesDataloaderIdx,
    TakesNoDataloaderIdx,
    RequiresDataloaderIdx,
):
    globals()[f"Ray{_body.__name__}"] = type(
        f"Ray{_body.__name__}", (_body, pl.LightningModule), {}
    )
    globals()[f"Lightning{_body.__name__}"] = type(
        f"Lightning{_body.__name__}", (_body, lightning.LightningModule), {}
    )


def _loaders(scale: int, sizes: tuple[int, ...]) -> list:
    """Loaders of ``size * scale`` samples: raylight's two ranks get half each (scale 2)."""
    return [
        loader(make_dataset(size * scale, seed=i), batch_size=BATCH) for i, size in enumerate(sizes)
    ]


def _run(trainer, module, train, val, test, predict) -> None:
    trainer.fit(module, train, val)
    if test:
        trainer.test(module, test)
    trainer.predict(module, predict, return_predictions=False)


def _records(folder) -> dict[str, list]:
    found = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as file:
            found[name.removesuffix(".jsonl")] = [json.loads(line) for line in file]
    return found


def _both(tmp_path, body: type, val_sizes: tuple[int, ...], predict_sizes: tuple[int, ...]):
    """Run the module in raylight (two workers) and pytorch-lightning (one CPU device)."""
    ray_cls, lightning_cls = _classes(body)
    folders = {name: tmp_path / name for name in ("raylight", "lightning")}
    for folder in folders.values():
        folder.mkdir()
    with_test = hasattr(body, "test_step")
    flags = dict(max_epochs=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False)
    flags.update(enable_checkpointing=False, enable_model_summary=False)
    ray_trainer = pl.Trainer(num_workers=2, **flags)
    _run(
        ray_trainer,
        ray_cls(str(folders["raylight"])),
        *_loaders(2, (32,)),
        _loaders(2, val_sizes),
        _loaders(2, (16,))[0] if with_test else None,
        _loaders(2, predict_sizes),
    )
    lightning_trainer = lightning.Trainer(accelerator="cpu", devices=1, **flags)
    _run(
        lightning_trainer,
        lightning_cls(str(folders["lightning"])),
        *_loaders(1, (32,)),
        _loaders(1, val_sizes),
        _loaders(1, (16,))[0] if with_test else None,
        _loaders(1, predict_sizes),
    )
    return _records(folders["raylight"]), _records(folders["lightning"])["rank0"]


def _received(records: list, hook: str) -> list:
    return [rest for name, size, rest in records if name == hook and size == BATCH]


@pytest.mark.parametrize(
    ("body", "takes_batch_idx"), [(TakesBatch, False), (TakesBatchIdx, True), (TakesArgs, True)]
)
def test_steps_get_batch_idx_only_when_they_take_it_as_in_lightning(
    ray_session, tmp_path, body, takes_batch_idx
):
    per_rank, in_lightning = _both(tmp_path, body, val_sizes=(16,), predict_sizes=(24,))
    assert sorted(per_rank) == ["rank0", "rank1"]
    for records in per_rank.values():
        assert records == in_lightning
        for hook, batches in [
            ("training_step", 4),
            ("validation_step", 2),
            ("test_step", 2),
            ("predict_step", 3),
        ]:
            wanted = [[i] if takes_batch_idx else [] for i in range(batches)]
            assert _received(records, hook) == wanted, hook


def test_two_loaders_pass_dataloader_idx_to_the_steps_that_take_it_as_in_lightning(
    ray_session, tmp_path
):
    per_rank, in_lightning = _both(
        tmp_path, TakesDataloaderIdx, val_sizes=(16, 24), predict_sizes=(8, 16)
    )
    for records in per_rank.values():
        assert records == in_lightning
        assert _received(records, "validation_step") == [[0, 0], [1, 0], [0, 1], [1, 1], [2, 1]]
        assert _received(records, "predict_step") == [[0, 0], [0, 1], [1, 1]]


def _lightnings_error(tmp_path, body: type, val_sizes: tuple[int, ...]) -> str:
    _, lightning_cls = _classes(body)
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, num_sanity_val_steps=0, logger=False
    )
    with pytest.raises(RuntimeError) as info:
        trainer.validate(lightning_cls(str(tmp_path)), _loaders(1, val_sizes), verbose=False)
    return str(info.value).replace(lightning_cls.__name__, "{name}")


@pytest.mark.parametrize(
    ("body", "val_sizes", "words"),
    [
        (TakesNoDataloaderIdx, (16, 24), "Try adding `dataloader_idx=0`"),
        (RequiresDataloaderIdx, (16,), "give it a default value"),
    ],
)
def test_a_step_that_cannot_take_the_loaders_fails_with_lightnings_error(
    ray_session, tmp_path, body, val_sizes, words
):
    ray_cls, _ = _classes(body)
    trainer = pl.Trainer(num_workers=2, logger=False, enable_progress_bar=False)
    with pytest.raises(RuntimeError) as info:
        trainer.validate(ray_cls(str(tmp_path)), _loaders(2, val_sizes), verbose=False)
    assert words in str(info.value)
    expected = _lightnings_error(tmp_path, body, val_sizes).format(name=ray_cls.__name__)
    assert str(info.value) == expected
