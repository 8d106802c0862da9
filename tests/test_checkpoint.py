"""trainer.save_checkpoint writes Lightning's keys; fit(ckpt_path=...) resumes exactly."""

from __future__ import annotations

import pytest
import torch
from models import Classifier, loader

import raylight as pl

pytestmark = pytest.mark.slow


class WithCheckpointHooks(Classifier):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__(lr=lr)
        self.restored_from_step = -1.0

    def on_save_checkpoint(self, checkpoint):
        checkpoint["extra"] = {"saved_at": self.global_step}

    def on_load_checkpoint(self, checkpoint):
        self.restored_from_step = float(checkpoint["extra"]["saved_at"])

    def training_step(self, batch, batch_idx):
        self.log("restored_from_step", self.restored_from_step)
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        num_workers=2, enable_progress_bar=False, logger=False, enable_checkpointing=False, **kwargs
    )


def test_checkpoint_has_lightning_keys(ray_session, tmp_path):
    model = WithCheckpointHooks()
    trainer = _trainer(max_epochs=2)
    trainer.fit(model, loader())
    path = tmp_path / "after.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 8
    assert checkpoint["pytorch-lightning_version"].startswith("2.")
    assert checkpoint["hyper_parameters"] == {"features": 8, "classes": 3, "lr": 0.1}
    assert checkpoint["extra"] == {"saved_at": 8}
    assert len(checkpoint["optimizer_states"]) == 1 and checkpoint["lr_schedulers"] == []
    assert set(checkpoint["state_dict"]) == set(model.state_dict())  # no DDP "module." prefix
    for name, value in model.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][name], value)
    assert not list(tmp_path.glob("*.partial*"))  # written under a temporary name, then renamed


def test_resume_at_an_epoch_boundary_matches_an_uninterrupted_run(ray_session, tmp_path):
    torch.manual_seed(1)
    straight, first_half = WithCheckpointHooks(), WithCheckpointHooks()
    first_half.load_state_dict(straight.state_dict())
    _trainer(max_epochs=4).fit(straight, loader(shuffle=True))

    half = _trainer(max_epochs=2)
    half.fit(first_half, loader(shuffle=True))
    half.save_checkpoint(tmp_path / "half.ckpt")
    half.shutdown()

    resumed_model = WithCheckpointHooks()
    resumed = _trainer(max_epochs=4)
    resumed.fit(resumed_model, loader(shuffle=True), ckpt_path=tmp_path / "half.ckpt")
    assert resumed.global_step == 16 and resumed.current_epoch == 4
    assert resumed.callback_metrics["restored_from_step"].item() == 8.0
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name


def test_missing_and_corrupt_checkpoints_are_clear_errors(ray_session, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        _trainer(max_epochs=1).fit(Classifier(), loader(), ckpt_path=tmp_path / "nope.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not be read"):
        _trainer(max_epochs=1).fit(Classifier(), loader(), ckpt_path=corrupt)


_NEW_DRIVER = """
import sys
import raylight as pl
from models import Classifier, loader

trainer = pl.Trainer(num_workers=2, max_epochs=int(sys.argv[2]), default_root_dir=sys.argv[1],
                     enable_progress_bar=False)
trainer.fit(Classifier(), loader(), loader(), ckpt_path=sys.argv[3] if len(sys.argv) > 3 else None)
print("global_step", trainer.global_step)
"""


def test_last_from_a_new_driver_uses_the_index_in_storage(ray_session, tmp_path):
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }

    def driver(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-c", _NEW_DRIVER, str(tmp_path), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    assert "global_step 8" in driver("2")
    # A second process, a new logger version directory: "last" still finds epoch 1's file.
    assert "global_step 12" in driver("3", "last")
    checkpoints = sorted(p.name for p in tmp_path.glob("lightning_logs/*/checkpoints/*.ckpt"))
    assert checkpoints == ["epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt"]


def test_best_and_last_in_the_same_process(ray_session, tmp_path):
    from models import ScriptedScore

    from raylight.callbacks import ModelCheckpoint

    callback = ModelCheckpoint(monitor="score", save_last=True)
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=4,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
    )
    trainer.fit(ScriptedScore(), loader(), loader())
    assert trainer._resolve_ckpt_path("best", "fit") == callback.best_model_path
    assert callback.best_model_path.endswith("epoch=3-step=16.ckpt")
    assert trainer._resolve_ckpt_path("last", "fit") == str(tmp_path / "checkpoints" / "last.ckpt")
    fresh = pl.Trainer(
        default_root_dir=tmp_path, logger=False, callbacks=[ModelCheckpoint(monitor="score")]
    )
    assert fresh._resolve_ckpt_path("best", "fit") == callback.best_model_path  # from the index
    with pytest.warns(UserWarning, match="no last checkpoint"):
        assert (
            pl.Trainer(default_root_dir=tmp_path / "empty")._resolve_ckpt_path("last", "fit")
            is None
        )


class WithDropout(Classifier):
    """Dropout makes the generator states part of what a resume must restore."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
        )

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


@pytest.mark.parametrize(
    ("accumulate", "resume_from"),
    [
        (1, "epoch=0-step=3.ckpt"),
        (1, "epoch=1-step=6.ckpt"),
        (1, "epoch=0-step=4.ckpt"),
        (2, "epoch=0-step=1.ckpt"),
    ],
)
def test_resume_mid_epoch_is_exact(ray_session, tmp_path, accumulate, resume_from):
    from raylight.callbacks import ModelCheckpoint

    torch.manual_seed(5)
    straight = WithDropout()
    initial = {k: v.clone() for k, v in straight.state_dict().items()}
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    common = dict(
        num_workers=2,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        accumulate_grad_batches=accumulate,
    )
    pl.seed_everything(7)
    pl.Trainer(callbacks=[every], **common).fit(straight, loader(shuffle=True))

    resumed = WithDropout()
    resumed.load_state_dict(initial)
    pl.seed_everything(7)
    trainer = pl.Trainer(enable_checkpointing=False, **common)
    trainer.fit(resumed, loader(shuffle=True), ckpt_path=tmp_path / resume_from)
    assert trainer.global_step == 8 // accumulate
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


class Wider(Classifier):
    def __init__(self, strict: bool = True) -> None:
        super().__init__()
        self.extra = torch.nn.Linear(3, 3)
        self.strict_loading = strict


def test_checkpoint_of_another_model_names_the_keys(tmp_path):
    from raylight.shared import checkpoint

    path = str(tmp_path / "small.ckpt")
    checkpoint.save({"state_dict": Classifier().state_dict(), "hyper_parameters": {}}, path)
    with pytest.raises(
        RuntimeError, match=r"does not fit Wider: missing keys \['extra.bias', 'extra.weight'\]"
    ):
        Wider.load_from_checkpoint(path)
    loose = Wider.load_from_checkpoint(path, strict=False)
    assert torch.equal(
        loose.layer[0].weight, torch.load(path, weights_only=True)["state_dict"]["layer.0.weight"]
    )


class FillsTheDisk(pl.Callback):
    """At the end of one epoch, before the checkpoint callbacks save, rank 0's disk fills up."""

    def __init__(self, folder: str, epoch: int) -> None:
        self.folder, self.epoch = folder, epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.is_global_zero and trainer.current_epoch == self.epoch:
            from conftest import fill

            fill(self.folder)


class PacedClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        import time

        time.sleep(0.05)  # lets the failed upload land while the next epoch has batches left
        return super().training_step(batch, batch_idx)


def test_a_full_disk_stops_the_fit_at_the_next_batch_and_keeps_what_was_saved(
    ray_session, small_disk
):
    import errno
    import os

    from raylight.callbacks import ModelCheckpoint
    from raylight.shared import checkpoint, checkpoint_index

    callback = ModelCheckpoint(dirpath=small_disk / "checkpoints", save_top_k=-1)
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=10,
        default_root_dir=small_disk,
        callbacks=[FillsTheDisk(str(small_disk), epoch=2), callback],
        logger=False,
        enable_progress_bar=False,
    )
    with pytest.raises(OSError) as info:
        trainer.fit(PacedClassifier(), loader())
    error = info.value
    assert error.errno == errno.ENOSPC
    assert "checkpoint upload to" in str(error)
    assert "epoch=2-step=12.ckpt failed at once: [Errno 28]" in str(error)
    notes = "\n".join(error.__notes__)
    assert "rank 0 raised OSError in train_epoch (epoch 3, batch" in notes  # not at fit's end
    assert not [p for p in small_disk.rglob("*") if ".partial-" in p.name]  # nothing left over
    os.remove(small_disk / "filler")
    # The checkpoints committed before the disk filled, and the index naming them, are whole.
    entries = checkpoint_index._read_index(str(small_disk))
    assert [os.path.basename(e["path"]) for e in entries] == [
        "epoch=0-step=4.ckpt",
        "epoch=1-step=8.ckpt",
    ]
    for entry in entries:
        assert checkpoint.load(entry["path"])["global_step"] == entry["global_step"]
    assert sorted(os.listdir(small_disk / "checkpoints")) == [
        "epoch=0-step=4.ckpt",
        "epoch=1-step=8.ckpt",
    ]
