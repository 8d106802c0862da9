"""``self.trainer`` inside the hooks: the attributes public modules and callbacks read have
Lightning's values on every rank; those with no meaning there fail with a clear error."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import Classifier, loader, make_dataset
from torch.utils.data import Subset

import raylight as pl

# What a module reads from its trainer, as public code does; every value must be the
# same under raylight (2 ranks, 64 samples each) and Lightning (1 device, 64 samples).
_READ = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "estimated_stepping_batches",
    "num_training_batches",
    "num_val_batches",
    "num_sanity_val_batches",
    "accumulate_grad_batches",
    "check_val_every_n_epoch",
    "val_check_interval",
    "num_sanity_val_steps",
    "limit_train_batches",
    "limit_val_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "log_every_n_steps",
    "fast_dev_run",
    "enable_validation",
    "is_global_zero",
    "sanity_checking",
    "training",
    "evaluating",
    "interrupted",
    "received_sigterm",
    "min_steps",
)


def _read(trainer):
    values = {name: getattr(trainer, name) for name in _READ}
    values["checkpoint_callback"] = type(trainer.checkpoint_callback).__name__
    values["early_stopping_callback"] = type(trainer.early_stopping_callback).__name__
    values["lr_scheduler_configs"] = [c.interval for c in trainer.lr_scheduler_configs]
    values["optimizers"] = [type(o).__name__ for o in trainer.optimizers]
    values["datamodule"] = trainer.datamodule
    values["num_nodes"] = trainer.num_nodes
    return values


class Reader(Classifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        steps = self.trainer.estimated_stepping_batches  # asked before the loop starts
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=steps)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def on_train_start(self):
        self.read = _read(self.trainer)
        self.last_batches = []

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.is_last_batch:
            self.last_batches.append(batch_idx)


def _callbacks(framework):
    return [
        framework.callbacks.ModelCheckpoint(monitor="val_loss"),
        framework.callbacks.EarlyStopping(monitor="val_loss", patience=100),
    ]


@pytest.mark.slow
def test_trainer_attributes_match_lightning(ray_session, tmp_path):
    flags = dict(max_epochs=3, accumulate_grad_batches=2, gradient_clip_val=1.0)
    flags |= dict(limit_val_batches=3, log_every_n_steps=5, enable_progress_bar=False)
    trainer = pl.Trainer(
        num_workers=2, default_root_dir=tmp_path / "ours", callbacks=_callbacks(pl), **flags
    )
    model = Reader()
    trainer.fit(model, loader(), loader())
    assert model.read["estimated_stepping_batches"] == 6  # 4 batches a rank / 2, 3 epochs
    assert model.read["num_nodes"] == 1 and model.last_batches == [3, 3, 3]

    import pytorch_lightning as lightning

    lightning_model = _lightning_reader(lightning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lightning.Trainer(
            accelerator="cpu",
            devices=1,
            default_root_dir=tmp_path / "lightning",
            callbacks=_callbacks(lightning),
            enable_model_summary=False,
            logger=False,
            **flags,
        )
        share = Subset(make_dataset(), range(64))  # one rank's share of the same data
        reference.fit(lightning_model, loader(share), loader(share))
    assert model.read == lightning_model.read
    assert model.last_batches == lightning_model.last_batches


def _lightning_reader(lightning):
    class LightningReader(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 3)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            loss = torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])
            self.log("val_loss", loss)

        configure_optimizers = Reader.configure_optimizers
        on_train_start = Reader.on_train_start
        on_train_batch_start = Reader.on_train_batch_start

    return LightningReader()


class Asker(Classifier):
    def on_fit_start(self):
        self.errors = {}
        for name in ("fit_loop", "accelerator", "fit", "no_such_attribute"):
            try:
                getattr(self.trainer, name)
            except AttributeError as error:
                self.errors[name] = str(error)
        self.facts = {
            "sampler": self.trainer.distributed_sampler_kwargs,
            "device_ids": self.trainer.device_ids,
            "log_dir": self.trainer.log_dir,
        }


@pytest.mark.slow
def test_attributes_without_meaning_on_a_rank_name_the_alternative(ray_session, tmp_path):
    model = Asker()
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, loader())
    errors = model.errors  # rank 0's, carried back with the module
    assert "not available inside raylight's workers" in errors["fit_loop"]
    assert "trainer.current_epoch" in errors["fit_loop"]
    assert "trainer.device" in errors["accelerator"]
    assert "run on the driver" in errors["fit"]
    assert (
        errors["no_such_attribute"] == "'RankTrainer' object has no attribute 'no_such_attribute'"
    )
    assert model.facts == {
        "sampler": {"num_replicas": 2, "rank": 0},
        "device_ids": [0],
        "log_dir": str(tmp_path),  # no logger: default_root_dir, as in Lightning
    }


class TwoGroups(Classifier):
    def configure_optimizers(self):
        first, second = self.layer[0], self.layer[2]
        return torch.optim.Adam(
            [{"params": first.parameters(), "lr": 0.1}, {"params": second.parameters()}], lr=0.01
        )


@pytest.mark.slow
def test_after_fit_the_drivers_trainer_holds_rank_zeros_optimizers(ray_session, tmp_path):
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    with pytest.raises(AttributeError, match="once a fit has ended"):
        _ = trainer.optimizers
    model = TwoGroups()
    trainer.fit(model, loader())
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.Adam)
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.01]
    ours = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert ours == {id(p) for p in model.parameters()}  # over the driver's own module
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    saved = torch.load(tmp_path / "end.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    state = optimizer.state_dict()["state"]
    assert state.keys() == saved.keys() and state[0]["step"] == 4  # 4 batches a rank
    for index, values in saved.items():
        assert all(torch.equal(values[key], state[index][key]) for key in values)
