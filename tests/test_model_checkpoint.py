"""ModelCheckpoint: Lightning's names, top-k, last, every_n_train_steps, state on the driver."""

from __future__ import annotations

import os

import pytest
import torch
from models import Classifier, ScriptedScore, loader

import raylight as pl
from raylight.callbacks import ModelCheckpoint
from raylight.shared.config import MisconfigurationException


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


def _fit(callback, max_epochs: int, module=None, ckpt_path=None) -> None:
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=max_epochs,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
    )
    trainer.fit(module or Classifier(), loader(), loader(), ckpt_path=ckpt_path)


def _crafted(path, tmp_path, **state) -> str:
    """``path``'s checkpoint, its ModelCheckpoint state rewritten as a crafted file would be."""
    saved = torch.load(path, weights_only=True)
    key = next(k for k in saved["callbacks"] if k.startswith("ModelCheckpoint"))
    saved["callbacks"][key].update(state)
    crafted = tmp_path / "crafted.ckpt"
    torch.save(saved, crafted)
    return str(crafted)


@pytest.mark.slow
@pytest.mark.parametrize("monitor", [None, "score"])
def test_a_checkpoint_from_elsewhere_never_deletes_files_outside_the_run(
    ray_session, tmp_path, monitor
):
    directory = tmp_path / "run" / "checkpoints"
    victim = tmp_path / "victim.txt"
    victim.write_text("not the run's")
    _fit(ModelCheckpoint(dirpath=directory, monitor=monitor), 1, ScriptedScore())
    (first,) = _names(directory)
    # The state now names a file outside the callback's directory as the checkpoint to replace:
    # as the last best (monitor=None), or as the worst of the top k (a score every new one beats).
    crafted = _crafted(
        directory / first,
        tmp_path,
        best_model_path=str(victim),
        best_k_models={str(victim): 99.0} if monitor else {},
        kth_best_model_path=str(victim) if monitor else "",
        kth_value=99.0 if monitor else None,
    )
    callback = ModelCheckpoint(dirpath=directory, monitor=monitor)
    _fit(callback, 3, ScriptedScore(), ckpt_path=crafted)
    assert victim.read_text() == "not the run's"
    assert os.path.exists(crafted)
    # Inside its own directory the callback still replaces its checkpoints as before.
    assert callback.best_model_path.startswith(str(directory))
    assert os.path.exists(callback.best_model_path)
    assert len(_names(directory)) == 2  # the first fit's file, and this fit's best


@pytest.mark.slow
def test_the_checkpoint_a_fit_resumes_from_is_kept(ray_session, tmp_path):
    """Lightning's rule: the top 1 moves on, but the file the fit started from stays."""
    _fit(ModelCheckpoint(dirpath=tmp_path), 1)
    assert _names(tmp_path) == ["epoch=0-step=4.ckpt"]
    callback = ModelCheckpoint(dirpath=tmp_path)
    _fit(callback, 3, ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"))
    assert _names(tmp_path) == ["epoch=0-step=4.ckpt", "epoch=2-step=12.ckpt"]
    assert callback.best_model_path == str(tmp_path / "epoch=2-step=12.ckpt")
