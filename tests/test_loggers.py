"""Loggers run on the driver: CSVLogger's and TensorBoardLogger's layouts, rows every
log_every_n_steps, hparams, and Lightning's choice of the default logger."""

from __future__ import annotations

import csv
import os
import time

import pytest
import yaml
from models import Classifier, loader, make_dataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import raylight as pl
import raylight.driver.inputs
from raylight.loggers import CSVLogger, TensorBoardLogger
from raylight.shared import storage


def test_csv_logger_layout_and_growing_header(tmp_path):
    logger = CSVLogger(tmp_path, name="runs", flush_logs_every_n_steps=2)
    logger.log_hyperparams({"lr": 0.1, "layers": (1, 2)})
    logger.log_metrics({"a": 1.0}, step=0)
    logger.log_metrics({"a": 2.0}, step=1)  # flushed here
    logger.log_metrics({"b": 3.0}, step=2)  # a new column: the file is rewritten
    logger.finalize("success")
    assert logger.log_dir == str(tmp_path / "runs" / "version_0")
    rows = list(csv.DictReader(open(tmp_path / "runs/version_0/metrics.csv")))
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert [r["a"] for r in rows] == ["1.0", "2.0", ""] and rows[2]["b"] == "3.0"
    assert yaml.safe_load(open(tmp_path / "runs/version_0/hparams.yaml")) == {
        "lr": 0.1,
        "layers": [1, 2],
    }
    assert CSVLogger(tmp_path, name="runs").version == 1  # the next run gets a new version


@pytest.mark.slow
def test_trainer_csv_logger_writes_lightning_rows(ray_session, tmp_path):
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=2,
        log_every_n_steps=2,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(Classifier(), loader(), loader())
    trainer.test(Classifier(), loader())
    assert trainer.log_dir == str(tmp_path / "lightning_logs" / "version_0")
    rows = list(csv.DictReader(open(tmp_path / "lightning_logs/version_0/metrics.csv")))
    train_steps = [int(r["step"]) for r in rows if r["train_loss"]]
    assert train_steps == [1, 3, 5, 7]  # every 2nd of 8 optimizer steps, counted from 0
    val_rows = [r for r in rows if r["val_loss"]]
    assert [(r["step"], r["epoch"]) for r in val_rows] == [("3", "0"), ("7", "1")]
    assert len([r for r in rows if r["test_acc"]]) == 1
    hparams = yaml.safe_load(open(tmp_path / "lightning_logs/version_0/hparams.yaml"))
    assert hparams == {"features": 8, "classes": 3, "lr": 0.1}


def test_logger_false_and_custom_loggers(tmp_path):
    assert pl.Trainer(logger=False).loggers == []
    custom = CSVLogger(tmp_path)
    assert pl.Trainer(logger=[custom]).logger is custom
    with pytest.raises(ValueError, match="a logger needs log_metrics"):
        pl.Trainer(logger=object())


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of ``folder``, as (step, value) pairs."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(event.step, round(event.value, 6)) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def test_tensorboard_logger_layout_prefix_and_hparams(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="runs", prefix="fold0", sub_dir="extra")
    logger.log_hyperparams({"lr": 0.1, "net": {"depth": 2}, "layers": (1, 2)})
    logger.log_metrics({"loss": 1.5}, step=0)
    logger.log_metrics({"loss": 0.5, "acc": 0.75}, step=1)
    logger.finalize("success")
    log_dir = tmp_path / "runs" / "version_0" / "extra"
    assert logger.log_dir == str(log_dir)
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert _scalars(log_dir) == {
        "fold0-hp_metric": [(0, -1.0)],  # Lightning's placeholder, under the prefix too
        "fold0-loss": [(0, 1.5), (1, 0.5)],
        "fold0-acc": [(1, 0.75)],
    }
    assert yaml.safe_load(open(log_dir / "hparams.yaml")) == {
        "lr": 0.1,
        "net": {"depth": 2},
        "layers": [1, 2],
    }
    assert TensorBoardLogger(tmp_path, name="runs").version == 1
    quiet = TensorBoardLogger(tmp_path, name="", version="named", default_hp_metric=False)
    quiet.log_hyperparams({"lr": 0.2})
    quiet.finalize("success")
    assert quiet.log_dir == str(tmp_path / "named")
    assert _scalars(tmp_path / "named") == {}  # no hp_metric without default_hp_metric
    assert yaml.safe_load(open(tmp_path / "named" / "hparams.yaml")) == {"lr": 0.2}


@pytest.mark.slow
def test_tensorboard_logger_writes_to_a_storage_uri(s3_server, tmp_path):
    logger = TensorBoardLogger(s3_server, name="tb")
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"loss": 2.0}, step=3)
    logger.finalize("success")
    assert logger.log_dir == storage.join(s3_server, "tb", "version_0")
    (tmp_path / "copy").mkdir()  # copy_tree into a local folder needs the folder
    storage.copy_tree(logger.log_dir, str(tmp_path / "copy"))
    assert _scalars(tmp_path / "copy") == {"hp_metric": [(0, -1.0)], "loss": [(3, 2.0)]}
    assert yaml.safe_load(open(tmp_path / "copy" / "hparams.yaml")) == {"lr": 0.1}
    # A later Trainer call logs to a new event file in the same version folder.
    logger.log_metrics({"test_acc": 0.5}, step=4)
    logger.finalize("success")
    (tmp_path / "again").mkdir()
    storage.copy_tree(logger.log_dir, str(tmp_path / "again"))
    assert _scalars(tmp_path / "again")["test_acc"] == [(4, 0.5)]
    assert TensorBoardLogger(s3_server, name="tb").version == 1


def test_default_logger_is_tensorboard_when_installed_else_csv(tmp_path, monkeypatch):
    default = pl.Trainer(default_root_dir=tmp_path).logger
    assert isinstance(default, TensorBoardLogger)
    assert default.log_dir == str(tmp_path / "lightning_logs" / "version_0")
    monkeypatch.setattr(raylight.driver.inputs, "tensorboard_available", lambda: False)
    assert isinstance(pl.Trainer(default_root_dir=tmp_path, logger=True).logger, CSVLogger)


@pytest.mark.slow
def test_trainer_default_tensorboard_logger_writes_lightning_steps(ray_session, tmp_path):
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=2,
        log_every_n_steps=2,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(Classifier(), loader(), loader())
    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert trainer.log_dir == str(log_dir)
    scalars = _scalars(log_dir)
    assert [step for step, _ in scalars["train_loss"]] == [1, 3, 5, 7]
    # Lightning counts the epoch's last batch in the step after its validation.
    assert [step for step, _ in scalars["val_loss"]] == [3, 7]
    assert (3, 0.0) in scalars["epoch"] and (7, 1.0) in scalars["epoch"]
    assert scalars["hp_metric"] == [(0, -1.0)]
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(
        scalars["val_loss"][-1][1], abs=1e-6
    )
    hparams = yaml.safe_load(open(log_dir / "hparams.yaml"))
    assert hparams == {"features": 8, "classes": 3, "lr": 0.1}


# ---- rows during the epoch ----------------------------------------------------------------------
class SlowSteps(Classifier):
    """40 batches an epoch on each of 2 ranks, at least 50 ms each; rank 1 exits hard before step
    ``die_at`` the first time (a marker file remembers)."""

    def __init__(self, marker: str = "", die_at: int = -1) -> None:
        super().__init__()
        self.marker, self.die_at = marker, die_at

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.trainer.global_step == self.die_at:
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)
        time.sleep(0.05)
        return super().training_step(batch, batch_idx)


class WatchingLogger(CSVLogger):
    """Records, for each train_loss row, the step the driver's Trainer had reached then."""

    def __init__(self, save_dir) -> None:
        super().__init__(save_dir)
        self.trainer = None
        self.seen: list[tuple[int, int]] = []  # (row's step, driver's global_step)

    def log_metrics(self, metrics, step=None):
        if "train_loss" in metrics:
            self.seen.append((step, self.trainer.global_step))
        super().log_metrics(metrics, step)


def _slow_fit(tmp_path, model, **kwargs) -> WatchingLogger:
    logger = WatchingLogger(tmp_path)
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=1,
        log_every_n_steps=1,
        logger=logger,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        **kwargs,
    )
    logger.trainer = trainer
    trainer.fit(model, loader(make_dataset(n=1280)))
    return logger


@pytest.mark.slow
def test_rows_reach_the_loggers_while_the_epoch_runs(ray_session, tmp_path):
    logger = _slow_fit(tmp_path, SlowSteps(), enable_checkpointing=False)
    assert [step for step, _ in logger.seen] == list(range(40))  # each once, in order
    # Rows written while the driver still waited for the epoch (whose end sets the step).
    assert sum(1 for _, driver_step in logger.seen if driver_step == 0) >= 5


@pytest.mark.slow
def test_rows_before_a_failure_are_kept_and_the_replayed_ones_logged_once(ray_session, tmp_path):
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=20)
    with pytest.warns(UserWarning, match=r"restarting the workers from .*step=20\.ckpt"):
        logger = _slow_fit(
            tmp_path,
            SlowSteps(str(tmp_path / "marker"), die_at=30),
            callbacks=[saver],
            max_failures=1,
        )
    assert os.path.exists(tmp_path / "marker")
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    assert [int(r["step"]) for r in rows if r["train_loss"]] == list(range(40))
