"""Lightning's callbacks that public code uses: BasePredictionWriter, OnExceptionCheckpoint,
DeviceStatsMonitor and GradientAccumulationScheduler, each on real fits, against
pytorch-lightning's own callback on one CPU device where that is cheap."""

from __future__ import annotations

import csv
import glob
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader, make_dataset
from pytorch_lightning import callbacks as lightning_callbacks
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger

import raylight as pl
from raylight.callbacks import (
    BasePredictionWriter,
    Callback,
    DeviceStatsMonitor,
    GradientAccumulationScheduler,
    OnExceptionCheckpoint,
)
from raylight.loggers import CSVLogger
from raylight.shared.config import MisconfigurationException

lightning = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.slow


class LightningClassifier(lightning.LightningModule):
    """``models.Classifier`` written for pytorch-lightning."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.layer = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )
        self.lr = lr

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0]).argmax(1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        num_workers=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _lightning_trainer(tmp_path, **kwargs) -> lightning.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return lightning.Trainer(**{**defaults, **kwargs})


# ---- BasePredictionWriter -------------------------------------------------------------------
class _Writes:
    """Saves what each write call gets, one file per call and rank."""

    def __init__(self, folder: str, write_interval: str) -> None:
        super().__init__(write_interval)
        self.folder = folder

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        name = f"batch-{trainer.global_rank}-{dataloader_idx}-{batch_idx}.pt"
        torch.save(
            {"prediction": prediction, "indices": batch_indices}, os.path.join(self.folder, name)
        )

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        torch.save(
            {"predictions": predictions, "indices": batch_indices},
            os.path.join(self.folder, f"epoch-{trainer.global_rank}.pt"),
        )


class Writer(_Writes, BasePredictionWriter):
    pass


class LightningWriter(_Writes, lightning_callbacks.BasePredictionWriter):
    pass


def _written(folder) -> dict[str, dict]:
    return {os.path.basename(p): torch.load(p) for p in glob.glob(os.path.join(folder, "*.pt"))}


def test_prediction_writer_gets_what_lightning_gives_on_one_device(ray_session, tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    model = Classifier()
    reference = LightningClassifier()
    reference.load_state_dict(model.state_dict())
    loaders = [
        loader(make_dataset(20), batch_size=8),
        loader(make_dataset(12, seed=1), batch_size=8),
    ]

    writer = Writer(str(ours), "batch_and_epoch")
    assert (
        _trainer(num_workers=1, callbacks=[writer]).predict(
            model, loaders, return_predictions=False
        )
        is None
    )
    _lightning_trainer(
        tmp_path, callbacks=[LightningWriter(str(theirs), "batch_and_epoch")]
    ).predict(reference, loaders, return_predictions=False)

    written, expected = _written(ours), _written(theirs)
    assert sorted(written) == sorted(expected)
    assert len(written) == 3 + 2 + 1  # batches of the two loaders, then the epoch
    for name, value in expected.items():
        assert str(written[name]) == str(value), name
    assert written["epoch-0.pt"]["indices"] == [
        [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))],
        [list(range(0, 8)), list(range(8, 12))],
    ]


def test_prediction_writer_on_two_ranks_covers_the_dataset_once(ray_session, tmp_path):
    model = Classifier()
    data = make_dataset(40)
    _trainer(callbacks=[Writer(str(tmp_path), "epoch")]).predict(
        model, loader(data, batch_size=8), return_predictions=False
    )
    written = _written(tmp_path)
    assert sorted(written) == ["epoch-0.pt", "epoch-1.pt"]  # no per-batch files
    indices, predictions = [], []
    for rank in (0, 1):
        (per_batch,) = written[f"epoch-{rank}.pt"]["indices"]  # one loader
        indices += [i for batch in per_batch for i in batch]
        predictions += [p for batch in written[f"epoch-{rank}.pt"]["predictions"] for p in batch]
    assert indices == list(range(40))  # contiguous, unpadded slices, in rank order
    expected = model(data.tensors[0]).argmax(1)
    assert torch.equal(torch.stack(predictions), expected)


def test_prediction_writer_interval_is_checked():
    with pytest.raises(MisconfigurationException, match="`write_interval` should be one of"):
        Writer("unused", "step")


# ---- OnExceptionCheckpoint ----------------------------------------------------------------------
class FailsOnRankOne(Classifier):
    """Rank 1 raises at epoch 1, batch 2, while rank 0 waits in the gradient all-reduce."""

    def __init__(self, fail: bool = True) -> None:
        super().__init__()
        self.fail = fail

    def training_step(self, batch, batch_idx):
        if self.fail and self.global_rank == 1 and self.current_epoch == 1 and batch_idx == 2:
            raise RuntimeError("failing on purpose")
        return super().training_step(batch, batch_idx)


def test_on_exception_checkpoint_saves_where_lightning_does_and_resumes(ray_session, tmp_path):
    dirpath = f"file://{tmp_path}/crash"  # a storage URI
    callback = OnExceptionCheckpoint(dirpath)
    assert callback.ckpt_path == f"{tmp_path}/crash/on_exception.ckpt"
    assert lightning_callbacks.OnExceptionCheckpoint(f"{tmp_path}/crash").ckpt_path == (
        callback.ckpt_path
    )
    torch.manual_seed(0)
    initial = FailsOnRankOne().state_dict()
    failing = FailsOnRankOne()
    failing.load_state_dict(initial)
    with pytest.raises(RuntimeError, match="failing on purpose"):
        _trainer(max_epochs=2, callbacks=[callback], process_group_timeout_s=600).fit(
            failing, loader()
        )

    saved = torch.load(callback.ckpt_path, weights_only=True)
    # 4 steps per rank in epoch 0, then batches 0 and 1 of epoch 1
    assert saved["global_step"] == 6 and saved["epoch"] == 1
    assert saved["raylight"]["next_epoch"] == 1 and saved["raylight"]["batches_done"] == 2
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2
    assert Classifier.load_from_checkpoint(callback.ckpt_path).state_dict().keys() == (
        initial.keys()
    )

    straight = FailsOnRankOne(fail=False)
    straight.load_state_dict(initial)
    _trainer(max_epochs=2).fit(straight, loader())
    resumed = FailsOnRankOne(fail=False)
    trainer = _trainer(max_epochs=2, callbacks=[OnExceptionCheckpoint(dirpath)])
    trainer.fit(resumed, loader(), ckpt_path=callback.ckpt_path)
    assert trainer.global_step == 8
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    # A fit that ends normally removes the file, as Lightning's teardown does.
    assert not os.path.exists(callback.ckpt_path)


def test_on_exception_checkpoint_needs_a_filename():
    with pytest.raises(ValueError, match="The filename cannot be empty"):
        OnExceptionCheckpoint(".", filename="")


# ---- DeviceStatsMonitor --------------------------------------------------------------------------
def _logged_stats(metrics_csv: str) -> set[tuple[str, int]]:
    """(key, step) of every DeviceStatsMonitor value in a CSV logger's file."""
    with open(metrics_csv) as file:
        rows = list(csv.DictReader(file))
    return {
        (key, int(row["step"]))
        for row in rows
        for key, value in row.items()
        if key.startswith("DeviceStatsMonitor") and value not in ("", None)
    }


def test_device_stats_logged_at_lightnings_keys_and_steps(ray_session, tmp_path):
    options = dict(max_epochs=2, log_every_n_steps=2, limit_val_batches=2, num_sanity_val_steps=0)
    trainer = _trainer(
        num_workers=2,
        logger=CSVLogger(tmp_path / "ours"),
        callbacks=[DeviceStatsMonitor()],
        **options,
    )
    trainer.fit(Classifier(), loader(), loader())  # 4 batches per rank and epoch
    reference = _lightning_trainer(
        tmp_path,
        logger=LightningCSVLogger(tmp_path / "theirs"),
        callbacks=[lightning_callbacks.DeviceStatsMonitor()],
        limit_train_batches=4,
        **options,
    )
    reference.fit(LightningClassifier(), loader(), loader())

    ours = _logged_stats(f"{tmp_path}/ours/lightning_logs/version_0/metrics.csv")
    theirs = _logged_stats(f"{tmp_path}/theirs/lightning_logs/version_0/metrics.csv")
    assert ours == theirs
    assert ("DeviceStatsMonitor.on_train_batch_start/cpu_percent", 1) in ours
    assert ("DeviceStatsMonitor.on_validation_batch_end/cpu_vm_percent", 3) in ours

    with pytest.raises(MisconfigurationException, match="logger=False"):
        _trainer(callbacks=[DeviceStatsMonitor()], max_epochs=1).fit(Classifier(), loader())


# ---- GradientAccumulationScheduler ------------------------------------------------------------------
class StepsPerEpoch(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.factors: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps.append(trainer.global_step - sum(self.steps))
        self.factors.append(trainer.accumulate_grad_batches)


class LightningStepsPerEpoch(StepsPerEpoch, lightning_callbacks.Callback):
    pass


def test_accumulation_follows_the_schedule_as_in_lightning(ray_session, tmp_path):
    torch.manual_seed(0)
    model, reference = Classifier(), LightningClassifier()
    reference.load_state_dict(model.state_dict())
    counter = StepsPerEpoch()
    trainer = _trainer(
        num_workers=1,
        max_epochs=3,
        callbacks=[GradientAccumulationScheduler({1: 2, 2: 3}), counter],
    )
    trainer.fit(model, loader(batch_size=16))  # 8 batches an epoch
    assert counter.steps == [8, 4, 3] and counter.factors == [1, 2, 3]  # 8 = 3 + 3 + 2

    lightning_counter = LightningStepsPerEpoch()
    _lightning_trainer(
        tmp_path,
        max_epochs=3,
        callbacks=[
            lightning_callbacks.GradientAccumulationScheduler({1: 2, 2: 3}),
            lightning_counter,
        ],
    ).fit(reference, loader(batch_size=16))
    assert lightning_counter.steps == counter.steps
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=1e-6)

    two_ranks = StepsPerEpoch()
    trainer = _trainer(
        max_epochs=3, callbacks=[GradientAccumulationScheduler({1: 2, 2: 3}), two_ranks]
    )
    trainer.fit(Classifier(), loader(batch_size=8))  # 8 batches per rank and epoch
    assert two_ranks.steps == [8, 4, 3] and trainer.global_step == 15
    assert trainer.config.accumulate_grad_batches == 1  # the driver's configuration is untouched

    with pytest.raises(ValueError, match="Either remove `accumulate_grad_batches`"):
        _trainer(
            max_epochs=1,
            accumulate_grad_batches=2,
            callbacks=[GradientAccumulationScheduler({0: 2})],
        ).fit(Classifier(), loader())


def test_accumulation_schedule_arguments_and_manual_optimization():
    with pytest.raises(TypeError, match="Empty dict"):
        GradientAccumulationScheduler({})
    with pytest.raises(MisconfigurationException, match="Epoch should be an int"):
        GradientAccumulationScheduler({-1: 2})
    with pytest.raises(MisconfigurationException, match="Accumulation factor should be an int"):
        GradientAccumulationScheduler({0: 0})
    scheduler = GradientAccumulationScheduler({3: 4})
    assert scheduler.scheduling == {3: 4, 0: 1}
    assert [scheduler.get_accumulate_grad_batches(e) for e in range(5)] == [1, 1, 1, 4, 4]
    manual = SimpleNamespace(automatic_optimization=False)
    with pytest.raises(RuntimeError, match="not supported for manual optimization"):
        scheduler.on_train_start(SimpleNamespace(), manual)
