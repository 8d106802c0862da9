"""A raylight checkpoint is a Lightning checkpoint, and the other way round."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader

import raylight as pl

lightning = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.slow


class LightningClassifier(lightning.LightningModule):
    """The same model written for pytorch-lightning."""

    def __init__(self, features: int = 8, classes: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Sequential(
            torch.nn.Linear(features, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes)
        )

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_raylight_checkpoint_loads_in_lightning_and_raylight(ray_session, tmp_path):
    model = Classifier(lr=0.05)
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, loader())
    path = tmp_path / "raylight.ckpt"
    trainer.save_checkpoint(path)

    in_lightning = LightningClassifier.load_from_checkpoint(path)
    in_raylight = Classifier.load_from_checkpoint(path)
    assert in_lightning.hparams.lr == in_raylight.hparams.lr == 0.05
    for name, value in model.state_dict().items():
        assert torch.equal(in_lightning.state_dict()[name], value)
        assert torch.equal(in_raylight.state_dict()[name], value)


def test_lightning_checkpoint_resumes_in_raylight(ray_session, tmp_path):
    lightning_trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    lightning_trainer.fit(LightningClassifier(), loader())
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")  # Lightning's default checkpoint

    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    model = Classifier()
    trainer.fit(model, loader(), ckpt_path=path)
    assert trainer.global_step == 8 + 4  # 8 steps in Lightning, then one epoch on 2 ranks
    assert trainer.current_epoch == 2


def test_lightning_mid_epoch_checkpoint_resumes_in_raylight_at_its_batch(ray_session, tmp_path):
    every_3_steps = lightning.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "pl", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    lightning_trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[every_3_steps],
    )
    uninterrupted = LightningClassifier()
    lightning_trainer.fit(uninterrupted, loader())  # 8 batches of 16

    trainer = pl.Trainer(
        num_workers=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    model = Classifier()
    trainer.fit(model, loader(), ckpt_path=tmp_path / "pl" / "step=3.ckpt")
    assert trainer.global_step == 8  # batches 3..7 of epoch 0, not a replayed epoch
    for name, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)


@pytest.mark.parametrize(
    ("step", "max_epochs", "steps_after"), [(3, 1, 8), (8, 2, 16), ("end", 2, 16)]
)
def test_raylight_checkpoints_resume_in_lightning(
    ray_session, tmp_path, step, max_epochs, steps_after
):
    every_step = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "rl", every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    trainer = pl.Trainer(
        num_workers=1,  # Lightning below runs on one device: the same batches per epoch
        max_epochs=1,
        logger=False,
        callbacks=[every_step],
        enable_progress_bar=False,
    )
    trainer.fit(Classifier(), loader())  # 8 batches
    trainer.save_checkpoint(tmp_path / "rl" / "step=end.ckpt")  # after the epoch's end hooks
    checkpoint = torch.load(tmp_path / "rl" / f"step={step}.ckpt", weights_only=True)
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert progress["current"]["processed"] == (8 if step == "end" else step)
    assert progress["is_last_batch"] == (step != 3)

    lightning_trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    lightning_trainer.fit(
        LightningClassifier(), loader(), ckpt_path=tmp_path / "rl" / f"step={step}.ckpt"
    )
    # Lightning continues the epoch from the recorded batch count (it replays the
    # loader from its start: its own limit), or starts the next epoch after the last batch.
    assert lightning_trainer.global_step == steps_after
    assert lightning_trainer.current_epoch == max_epochs
