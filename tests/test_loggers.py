"""Loggers run on the driver: CSVLogger's layout, rows every log_every_n_steps, hparams."""

from __future__ import annotations

import csv

import pytest
import yaml
from models import Classifier, loader

import raylight as pl
from raylight.loggers import CSVLogger


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
def test_trainer_default_logger_writes_lightning_rows(ray_session, tmp_path):
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=2,
        log_every_n_steps=2,
        default_root_dir=tmp_path,
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
    assert [(r["step"], r["epoch"]) for r in val_rows] == [("4", "0.0"), ("8", "1.0")]
    assert len([r for r in rows if r["test_acc"]]) == 1
    hparams = yaml.safe_load(open(tmp_path / "lightning_logs/version_0/hparams.yaml"))
    assert hparams == {"features": 8, "classes": 3, "lr": 0.1}


def test_logger_false_and_custom_loggers(tmp_path):
    assert pl.Trainer(logger=False).loggers == []
    custom = CSVLogger(tmp_path)
    assert pl.Trainer(logger=[custom]).logger is custom
    with pytest.raises(ValueError, match="a logger needs log_metrics"):
        pl.Trainer(logger=object())
