"""ModelCheckpoint: Lightning's names, top-k, last, every_n_train_steps, state on the driver."""

from __future__ import annotations

import os

import pytest
import torch
from models import Classifier, ScriptedScore, loader

import raylight as pl
from raylight.callbacks import ModelCheckpoint
from raylight.config import MisconfigurationException


def _names(directory) -> list[str]:
    """The checkpoint files (the run's index may share the directory)."""
    return sorted(name for name in os.listdir(directory) if name.endswith(".ckpt"))


def test_format_checkpoint_name():
    callback = ModelCheckpoint(filename="{epoch}-{val/loss:.2f}")
    assert (
        callback.format_checkpoint_name({"epoch": 3, "val/loss": 0.1234}) == "epoch=3-val/loss=0.12"
    )
    plain = ModelCheckpoint(filename="{epoch:02d}", auto_insert_metric_name=False)
    assert plain.format_checkpoint_name({"epoch": 3}) == "03"


def test_bad_arguments():
    with pytest.raises(MisconfigurationException, match="No quantity for top_k to track"):
        ModelCheckpoint(save_top_k=3)
    with pytest.raises(MisconfigurationException, match="enable_checkpointing=False"):
        pl.Trainer(enable_checkpointing=False, callbacks=[ModelCheckpoint()])


@pytest.mark.slow
def test_default_checkpoint_keeps_the_latest_epoch(ray_session, tmp_path):
    trainer = pl.Trainer(
        num_workers=2, max_epochs=2, default_root_dir=tmp_path, enable_progress_bar=False
    )
    trainer.fit(Classifier(), loader(), loader())
    directory = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert _names(directory) == ["epoch=1-step=8.ckpt"]
    assert trainer.checkpoint_callback.best_model_path == str(directory / "epoch=1-step=8.ckpt")
    assert torch.load(directory / "epoch=1-step=8.ckpt", weights_only=True)["global_step"] == 8


@pytest.mark.slow
def test_top_k_on_a_monitored_metric_with_last(ray_session, tmp_path):
    callback = ModelCheckpoint(
        dirpath=tmp_path,
        filename="{epoch}-{score:.1f}",
        monitor="score",
        save_top_k=2,
        save_last=True,
    )
    trainer = pl.Trainer(
        num_workers=2, max_epochs=4, callbacks=[callback], logger=False, enable_progress_bar=False
    )
    trainer.fit(ScriptedScore(), loader(), loader())
    assert _names(tmp_path) == ["epoch=1-score=1.0.ckpt", "epoch=3-score=0.0.ckpt", "last.ckpt"]
    # The driver's callback object carries rank 0's bookkeeping.
    assert callback.best_model_path == str(tmp_path / "epoch=3-score=0.0.ckpt")
    assert callback.best_model_score == 0.0
    assert set(callback.best_k_models.values()) == {0.0, 1.0}
    assert callback.last_model_path == str(tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 3


@pytest.mark.slow
def test_every_n_train_steps_keeps_all(ray_session, tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(
        num_workers=2, max_epochs=2, callbacks=[callback], logger=False, enable_progress_bar=False
    )
    trainer.fit(Classifier(), loader())
    assert _names(tmp_path) == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt"]


@pytest.mark.slow
def test_unlogged_monitor_gives_lightnings_message(ray_session, tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc")
    trainer = pl.Trainer(
        num_workers=2, max_epochs=1, callbacks=[callback], logger=False, enable_progress_bar=False
    )
    with pytest.raises(
        MisconfigurationException, match=r"could not find the monitored key.*val_loss"
    ):
        trainer.fit(Classifier(), loader(), loader())


@pytest.mark.slow
def test_a_fixed_filename_is_replaced_by_each_improvement(ray_session, tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="score")
    trainer = pl.Trainer(
        num_workers=2, max_epochs=4, callbacks=[callback], logger=False, enable_progress_bar=False
    )
    trainer.fit(ScriptedScore(), loader(), loader())
    assert _names(tmp_path) == ["best.ckpt"]
    assert callback.best_model_score == 0.0
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == 3


@pytest.mark.slow
def test_save_last_link_and_train_time_interval(ray_session, tmp_path):
    import datetime

    linked = ModelCheckpoint(dirpath=tmp_path / "linked", monitor="score", save_last="link")
    timed = ModelCheckpoint(
        dirpath=tmp_path / "timed", save_top_k=-1, train_time_interval=datetime.timedelta(seconds=0)
    )
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=4,
        callbacks=[linked, timed],
        logger=False,
        enable_progress_bar=False,
        limit_train_batches=2,
    )
    trainer.fit(ScriptedScore(), loader(), loader())
    last = tmp_path / "linked" / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch=3-step=8.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 8
    # An interval of zero is due after every batch: one checkpoint per optimizer step.
    assert len(_names(tmp_path / "timed")) == 8
