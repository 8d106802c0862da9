"""Lightning's Trainer flags beyond the core ones: each works with Lightning's semantics or
is refused by name."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from models import Classifier, IndexedDataset, loader, make_dataset
from torch.utils.data import DataLoader, DistributedSampler

import raylight as pl
from raylight.driver import profile_report
from raylight.shared.config import MisconfigurationException


def _lightning():
    import pytorch_lightning

    return pytorch_lightning


@pytest.mark.parametrize(
    "flag",
    [
        {"enable_checkpointing": True},
        {"logger": True},
        {"enable_progress_bar": True},
        {"log_every_n_steps": 5},
        {"enable_model_summary": True},
        {"num_sanity_val_steps": 2},
        {"fast_dev_run": True},
        {"detect_anomaly": True},
        {"profiler": "simple"},
    ],
)
def test_barebones_refuses_what_it_turns_off_in_lightnings_words(flag):
    with pytest.raises(ValueError) as ours:
        pl.Trainer(barebones=True, **flag)
    with warnings.catch_warnings(), pytest.raises(ValueError) as theirs:
        warnings.simplefilter("ignore")
        _lightning().Trainer(barebones=True, accelerator="cpu", **flag)
    assert str(ours.value) == str(theirs.value)


def test_flags_out_of_range_are_refused_by_name():
    with pytest.raises(MisconfigurationException, match="overfit_batches=-1"):
        pl.Trainer(overfit_batches=-1)
    with pytest.raises(MisconfigurationException, match="reload_dataloaders_every_n_epochs"):
        pl.Trainer(reload_dataloaders_every_n_epochs=-2)
    with pytest.raises(MisconfigurationException, match="profiler='advanced'.*not supported"):
        pl.Trainer(profiler="advanced")


def test_max_time_adds_lightnings_timer_unless_one_is_given():
    trainer = pl.Trainer(max_time={"minutes": 5})
    timers = [cb for cb in trainer.callbacks if isinstance(cb, pl.callbacks.Timer)]
    assert len(timers) == 1 and timers[0]._duration == 300 and timers[0]._interval == "step"
    mine = pl.callbacks.Timer(duration="00:01:00:00")
    with pytest.warns(UserWarning, match="already contains a Timer"):
        trainer = pl.Trainer(max_time="00:00:05:00", callbacks=[mine])
    assert [cb for cb in trainer.callbacks if isinstance(cb, pl.callbacks.Timer)] == [mine]


class Recorder(Classifier):
    """Records, on rank 0, what each flag changes inside the workers."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(8)
        self.seen: list[list[int]] = []
        self.loads = {"train": 0, "val": 0}

    def forward(self, x):
        return self.layer(self.norm(x))

    def train_dataloader(self):
        self.loads["train"] += 1
        return DataLoader(IndexedDataset(64), batch_size=8, shuffle=True)

    def val_dataloader(self):
        self.loads["val"] += 1
        return loader(batch_size=8)

    def on_train_epoch_start(self):
        self.seen.append([])
        self.flags = {
            "norm": type(self.norm).__name__,
            "anomaly": torch.is_anomaly_enabled(),
            "benchmark": torch.backends.cudnn.benchmark,
        }
        self.val_batches = self.trainer.num_val_batches

    def training_step(self, batch, batch_idx):
        self.seen[-1].extend(batch[2].tolist())
        if self.current_epoch == 0 and batch_idx == 0:
            self.first_batch = batch[0]
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_overfit_reload_sync_batchnorm_benchmark_and_anomaly_reach_the_ranks(ray_session, tmp_path):
    model = Recorder()
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=3,
        overfit_batches=2,
        reload_dataloaders_every_n_epochs=1,
        benchmark=True,
        detect_anomaly=True,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
    )
    with pytest.warns(UserWarning, match="turning off the train dataloader shuffling"):
        trainer.fit(model)
    # overfit_batches: the same two unshuffled batches of rank 0's share in every epoch.
    share = list(DistributedSampler(range(64), num_replicas=2, rank=0, shuffle=False))
    assert model.seen == [share[:16]] * 3
    assert model.val_batches == [2]
    # reload_dataloaders_every_n_epochs=1: new loaders every epoch, as Lightning asks.
    assert model.loads == {"train": 3, "val": 3}
    assert model.flags == {"norm": "BatchNorm1d", "anomaly": True, "benchmark": True}


class Barebones(Classifier):
    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("loss", loss)
        return loss


@pytest.mark.slow
def test_barebones_trains_without_logs_checkpoints_or_summary(ray_session, tmp_path, capsys):
    trainer = pl.Trainer(num_workers=2, max_epochs=1, barebones=True, default_root_dir=tmp_path)
    assert trainer.loggers == [] and not trainer.checkpoint_callbacks
    with pytest.warns(UserWarning, match="barebones=True"):
        trainer.fit(Barebones(), loader())
    assert trainer.global_step == 4
    assert "loss" not in trainer.callback_metrics
    assert list(tmp_path.iterdir()) == []  # no logs, no checkpoints
    assert "Total params" not in capsys.readouterr().err


class SyncedNorm(pl.LightningModule):
    """One step through a BatchNorm on the raw inputs: its running mean shows whose
    statistics it saw."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.head(self.norm(batch[0])), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_sync_batchnorm_on_cpu_workers_is_refused_with_the_reason():
    with pytest.raises(MisconfigurationException, match="sync_batchnorm=True.*GPU"):
        pl.Trainer(num_workers=2, use_gpu=False, sync_batchnorm=True)


@pytest.mark.requires_gpu
def test_sync_batchnorm_averages_statistics_over_every_rank(ray_session, tmp_path):
    data = make_dataset(32)
    model = SyncedNorm()
    trainer = pl.Trainer(
        num_workers=2,
        use_gpu=True,
        max_epochs=1,
        sync_batchnorm=True,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=16))
    # One step over the whole data set (16 samples on each rank): momentum 0.1 from zero.
    expected = 0.1 * data.tensors[0].mean(0)
    assert torch.allclose(model.norm.running_mean.cpu(), expected, atol=1e-6)


def test_profile_report_reads_every_ranks_figures():
    per_rank = [
        {"[LightningModule]M.training_step": [4, 2.0], "run_training_epoch": [1, 3.0]},
        {"[LightningModule]M.training_step": [4, 6.0], "run_training_epoch": [1, 7.0]},
    ]
    table = profile_report.report("fit", per_rank, 10.0)
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if "|" in line}
    cells = [cell.strip() for cell in lines["[LightningModule]M.training_step"].split("|")[1:-1]]
    # mean over all 8 calls, one rank's calls, the slowest rank's total, its rank, its share
    assert cells == ["[LightningModule]M.training_step", "1", "4", "6", "1", "60 %"]
    assert table.startswith("FIT Profiler Report (2 ranks)")
    assert table.index("run_training_epoch") < table.index("M.training_step")  # by total


class Profiled(Classifier):
    def on_train_epoch_end(self):
        with self.trainer.profiler.profile("my_block"):
            pass


@pytest.mark.slow
def test_simple_profiler_prints_every_hook_of_every_rank(ray_session, tmp_path, capsys):
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=2,
        profiler="simple",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        logger=False,
    )
    trainer.fit(Profiled(), loader(), loader())
    trainer.test(Profiled(), loader())
    err = capsys.readouterr().err
    fit_report = err[err.index("FIT Profiler Report (2 ranks)") : err.index("TEST Profiler")]

    def calls(action):
        row = next(line for line in fit_report.splitlines() if f"|  {action} " in line)
        return int(row.split("|")[3])

    assert calls("[LightningModule]Profiled.training_step") == 4 * 2  # batches a rank x epochs
    assert calls("run_training_epoch") == 2
    assert calls("my_block") == 2
    assert calls("[Callback]ModelCheckpoint.on_train_epoch_end") == 2
    assert "[LightningModule]Profiled.test_step" in err[err.index("TEST Profiler") :]
