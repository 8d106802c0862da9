"""LearningRateMonitor: Lightning's key names, and the values a two-rank run logs per step or
epoch, as they reach the driver's CSVLogger."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from models import Classifier, loader
from pytorch_lightning.callbacks import LearningRateMonitor as LightningMonitor

import raylight as pl
from raylight.callbacks import LearningRateMonitor
from raylight.loggers import CSVLogger
from raylight.rank.optim import LRSchedulerConfig
from raylight.shared.config import MisconfigurationException


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))


def _groups(net, **second):
    return [{"params": net[0].parameters()}, {"params": net[1].parameters(), **second}]


def _setups():
    """(optimizers, scheduler configs) in the shapes Lightning names differently."""
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    yield [sgd], [LRSchedulerConfig(torch.optim.lr_scheduler.StepLR(sgd, 1))]
    adam = torch.optim.Adam(_groups(net), lr=0.1)
    yield [adam], []
    named = torch.optim.Adam(_groups(net, name="head"), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(named, 1)
    yield [named], [LRSchedulerConfig(scheduler, interval="step", name="my_lr")]
    first, second = (
        torch.optim.SGD(net.parameters(), lr=0.1),
        torch.optim.SGD(net.parameters(), lr=1),
    )
    third = torch.optim.Adam(net.parameters(), lr=0.1)
    yield [first, second, third], [LRSchedulerConfig(torch.optim.lr_scheduler.StepLR(second, 1))]


@pytest.mark.parametrize("setup", list(_setups()), ids=["sgd", "groups", "named", "several"])
def test_names_match_lightning(setup):
    optimizers, configs = setup
    trainer = SimpleNamespace(
        optimizers=optimizers,
        lr_scheduler_configs=configs,
        loggers=[object()],
        callback_metrics={},
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        device=torch.device("cpu"),
        is_global_zero=True,
        log_every_n_steps=1,
        should_stop=False,
        _batches_that_stepped=0,
        _log_rows=[],
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)),
        _logger_connector=SimpleNamespace(should_update_logs=True),
    )
    ours = LearningRateMonitor(log_momentum=True, log_weight_decay=True)
    theirs = LightningMonitor(log_momentum=True, log_weight_decay=True)
    for monitor in (ours, theirs):
        monitor.on_train_start(trainer, None)
    assert list(ours.lrs) == list(theirs.lrs)
    assert list(ours.last_momentum_values) == list(theirs.last_momentum_values)
    ours_stats = ours._extract_stats(trainer, "any")
    assert ours_stats == theirs._extract_stats(trainer, "any")
    assert trainer._log_rows == []  # rows are added by the hooks, on rank 0 only


def test_bad_interval_and_no_logger(tmp_path):
    with pytest.raises(MisconfigurationException, match="logging_interval should be"):
        LearningRateMonitor(logging_interval="batch")
    trainer = pl.Trainer(logger=False, callbacks=[LearningRateMonitor()], default_root_dir=tmp_path)
    with pytest.raises(MisconfigurationException, match="has no logger"):
        trainer.fit(Classifier(), loader())  # refused on the driver, before workers start


class EpochDecay(Classifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


class StepDecayTwoGroups(Classifier):
    def configure_optimizers(self):
        first, last = self.layer[0], self.layer[2]
        optimizer = torch.optim.Adam(
            [{"params": first.parameters()}, {"params": last.parameters(), "lr": 0.01}], lr=0.1
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "my_lr"},
        }


def _fit(tmp_path, model, monitor, **kwargs):
    trainer = pl.Trainer(
        num_workers=2,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(model, loader())  # 128 samples, batch 16: 4 steps per rank and epoch
    rows = list(csv.DictReader(open(tmp_path / "lightning_logs/version_0/metrics.csv")))
    return trainer, rows


def _series(rows, key):
    """(steps, values) of the rows that hold ``key``."""
    picked = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return [step for step, _ in picked], [value for _, value in picked]


@pytest.mark.slow
def test_epoch_scheduler_logged_at_each_epoch_start(ray_session, tmp_path):
    monitor = LearningRateMonitor(log_momentum=True)
    trainer, rows = _fit(tmp_path, EpochDecay(), monitor, max_epochs=3, log_every_n_steps=1)
    assert _series(rows, "lr-SGD") == ([0, 4, 8], [0.1, 0.05, 0.025])
    assert _series(rows, "lr-SGD-momentum") == ([0, 4, 8], [0.9, 0.9, 0.9])
    # Lightning's rows carry no epoch column: the monitor calls log_metrics directly.
    assert all(not r["epoch"] for r in rows if r["lr-SGD"])
    # The driver's callback carries rank 0's history; callback_metrics the latest value.
    assert monitor.lrs == {"lr-SGD": [0.1, 0.05, 0.025]}
    assert trainer.callback_metrics["lr-SGD"].item() == pytest.approx(0.025)


@pytest.mark.slow
def test_step_scheduler_logged_every_n_steps_per_group(ray_session, tmp_path):
    monitor = LearningRateMonitor(log_momentum=True)
    _, rows = _fit(tmp_path, StepDecayTwoGroups(), monitor, max_epochs=2, log_every_n_steps=3)
    # Logged before the step numbered 2, 5 (log_every_n_steps=3, counted from 0): the lr then
    # has decayed once per earlier step.
    steps, first = _series(rows, "my_lr/pg1")
    assert steps == [2, 5] and first == pytest.approx([0.1 * 0.5**2, 0.1 * 0.5**5])
    steps, last = _series(rows, "my_lr/pg2")
    assert steps == [2, 5] and last == pytest.approx([0.01 * 0.5**2, 0.01 * 0.5**5])
    assert _series(rows, "my_lr/pg1-momentum") == ([2, 5], [0.9, 0.9])  # Adam's beta1


@pytest.mark.slow
def test_logging_interval_epoch_overrides_the_scheduler_interval(ray_session, tmp_path):
    monitor = LearningRateMonitor(logging_interval="epoch")
    _, rows = _fit(tmp_path, StepDecayTwoGroups(), monitor, max_epochs=2, log_every_n_steps=1)
    steps, values = _series(rows, "my_lr/pg1")
    assert steps == [0, 4] and values == pytest.approx([0.1, 0.1 * 0.5**4])
