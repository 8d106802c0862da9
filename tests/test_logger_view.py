"""``self.logger`` inside the module and callbacks: views of the driver's loggers on the ranks,
whose calls rank 0 records and the driver replays on the real logger."""

from __future__ import annotations

import csv
import types

import cloudpickle
import matplotlib
import pytest
import torch
from models import Classifier, loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import raylight as pl
from raylight.driver import logger_relay
from raylight.loggers import CSVLogger, TensorBoardLogger
from raylight.rank.logger_view import rank_views
from raylight.shared import storage

matplotlib.use("Agg")


def _views(loggers, rank_zero=True):
    """The views a rank builds from what the driver ships (through a pickle round trip)."""
    trainer = types.SimpleNamespace(is_global_zero=rank_zero, _logger_calls=[])
    descriptions = cloudpickle.loads(cloudpickle.dumps(logger_relay.describe(loggers)))
    return rank_views(descriptions, trainer), trainer


def _events(folder):
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    return events


def test_a_view_is_the_loggers_class_with_the_drivers_folders(tmp_path):
    tensorboard, csv_logger = TensorBoardLogger(tmp_path), CSVLogger(tmp_path, name="csv")
    (view, csv_view), _ = _views([tensorboard, csv_logger])
    assert isinstance(view, TensorBoardLogger) and isinstance(csv_view, CSVLogger)
    assert (view.name, view.version, view.log_dir) == ("lightning_logs", 0, tensorboard.log_dir)
    assert csv_view.log_dir == csv_logger.log_dir
    # The CSV logger has no experiment, as in Lightning: the call fails where it is made.
    with pytest.raises(AttributeError, match="no method 'add_image'"):
        csv_view.experiment.add_image("x", torch.zeros(3, 2, 2))


def test_rank_zero_records_portable_calls_and_the_driver_replays_them(tmp_path):
    import matplotlib.pyplot as plt

    logger = TensorBoardLogger(tmp_path)
    (view,), trainer = _views([logger])
    image = torch.rand(3, 4, 4, requires_grad=True)
    view.experiment.add_image("img", image, 1)
    figure = plt.figure()
    plt.plot([1, 2, 3])
    view.experiment.add_figure("fig", figure, global_step=2)
    view.experiment.add_histogram("weights", torch.randn(50), 3)
    view.experiment.add_text("note", "hello", 4)
    view.log_metrics({"extra": torch.tensor(0.5)}, step=5)
    view.finalize("success")  # the driver's to do: nothing recorded
    assert not plt.fignum_exists(figure.number)  # add_figure closes it, as the writer does
    calls = trainer._logger_calls
    assert [(c["target"], c["method"]) for c in calls] == [
        ("experiment", "add_image"),
        ("experiment", "add_image"),  # the figure, drawn into an image on the rank
        ("experiment", "add_histogram"),
        ("experiment", "add_text"),
        ("logger", "log_metrics"),
    ]
    assert not calls[0]["args"][1].requires_grad
    assert calls[1]["kwargs"]["img_tensor"].shape[0] == 3
    with pytest.raises(AttributeError, match="no method 'add_imag'"):
        view.experiment.add_imag("typo", image)

    logger_relay.replay([logger], cloudpickle.loads(cloudpickle.dumps(calls)))
    logger.finalize("success")
    tags = _events(logger.log_dir).Tags()
    assert set(tags["images"]) == {"img", "fig"}
    assert tags["histograms"] == ["weights"]
    assert "extra" in tags["scalars"]


def test_other_ranks_do_nothing(tmp_path):
    (view,), trainer = _views([TensorBoardLogger(tmp_path)], rank_zero=False)
    view.experiment.add_image("img", torch.zeros(3, 2, 2), 0)
    view.experiment[0].log({"any": "call"})
    view.log_metrics({"a": 1.0}, step=0)
    assert trainer._logger_calls == []


class ImageLogger(Classifier):
    """Logs through ``self.logger`` as public modules do; records what its hooks saw."""

    def on_fit_start(self):
        self.seen = {
            "is_tensorboard": isinstance(self.logger, TensorBoardLogger),
            "log_dir": self.logger.log_dir,
            "trainer_log_dir": self.trainer.log_dir,
            "loggers": len(self.loggers),
        }
        self.validation_runs = 0

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        if batch_idx == 0 and not self.trainer.sanity_checking:
            self.validation_runs += 1
            self.logger.experiment.add_image("inputs", batch[0][:1].unsqueeze(0), self.global_step)

    def on_train_epoch_end(self):
        for name, parameter in self.named_parameters():
            self.logger.experiment.add_histogram(name, parameter, self.current_epoch)


class FigureCallback(pl.Callback):
    def on_validation_epoch_end(self, trainer, pl_module):
        import matplotlib.pyplot as plt

        if trainer.sanity_checking:
            return
        figure = plt.figure()
        plt.plot([0, trainer.current_epoch])
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("curve", figure, trainer.global_step)


def _fit_image_logger(root, logger):
    model = ImageLogger()
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=2,
        default_root_dir=root,
        logger=logger,
        callbacks=[FigureCallback()],
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, loader(), loader())
    return model, trainer


@pytest.mark.slow
def test_images_histograms_and_figures_land_in_the_run_folder(ray_session, tmp_path):
    logger = TensorBoardLogger(tmp_path)
    model, trainer = _fit_image_logger(tmp_path, logger)
    assert model.seen == {
        "is_tensorboard": True,
        "log_dir": logger.log_dir,
        "trainer_log_dir": logger.log_dir,
        "loggers": 1,
    }
    events = _events(logger.log_dir)
    # Rank 0's calls only: one image per validation run, not one per rank.
    assert [event.step for event in events.Images("inputs")] == [2, 4]
    assert model.validation_runs == 2  # rank 0's counter, carried back to the driver's model
    assert [event.step for event in events.Histograms("layer.0.weight")] == [0, 1]
    assert [event.step for event in events.Images("curve")] == [2, 4]
    assert "val_loss" in events.Tags()["scalars"]  # the same run folder as the metrics


@pytest.mark.slow
def test_logger_calls_reach_a_storage_uri_run_folder(ray_session, s3_server, tmp_path):
    logger = TensorBoardLogger(s3_server, name="uri")
    _fit_image_logger(tmp_path, logger)
    (tmp_path / "copy").mkdir()
    storage.copy_tree(logger.log_dir, str(tmp_path / "copy"))
    events = _events(tmp_path / "copy")
    assert [event.step for event in events.Images("inputs")] == [2, 4]
    assert [event.step for event in events.Images("curve")] == [2, 4]


class StepLogged(Classifier):
    def validation_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("val_step_only", loss, on_step=True, on_epoch=False)
        self.log("val_both", loss, on_step=True, on_epoch=True)

    def test_step(self, batch, batch_idx):
        self.log("test_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())


def _csv_rows(folder):
    with open(folder / "metrics.csv") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_step_level_evaluation_logs_and_test_rows_at_the_fits_position(ray_session, tmp_path):
    """Lightning's rows: validation steps at the batches seen by the fit's validation (no
    epoch), their epoch value at the training step, and test rows at the fit's epoch and
    step. The same fit under pytorch-lightning on one device writes the same steps."""
    logger = CSVLogger(tmp_path)
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        log_every_n_steps=100,
        default_root_dir=tmp_path,
        logger=logger,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    model = StepLogged()
    trainer.fit(model, loader(), loader())
    trainer.test(model, loader())
    rows = _csv_rows(tmp_path / "lightning_logs" / "version_0")
    steps = [(row["step"], row["epoch"]) for row in rows if row["val_step_only"]]
    assert steps == [(str(step), "") for step in range(4)]
    assert all(row["val_both_step"] == row["val_step_only"] for row in rows if row["val_step_only"])
    epoch_rows = [(row["step"], row["epoch"]) for row in rows if row["val_both_epoch"]]
    assert epoch_rows == [("2", "0"), ("5", "1")]
    test_rows = [(row["step"], row["epoch"]) for row in rows if row["test_acc"]]
    assert test_rows == [("6", "2")]
    assert _lightning_steps(tmp_path / "reference") == (steps, epoch_rows, test_rows)


def _lightning_steps(root):
    import warnings

    import pytorch_lightning as lightning

    class Reference(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 3)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        validation_step = StepLogged.validation_step
        test_step = StepLogged.test_step

        def forward(self, x):
            return self.layer(x)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = lightning.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=2,
            limit_train_batches=3,
            limit_val_batches=2,
            log_every_n_steps=100,
            logger=lightning.loggers.CSVLogger(root),
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        trainer.fit(Reference(), loader(), loader())
        trainer.test(trainer.lightning_module, loader())
    rows = _csv_rows(root / "lightning_logs" / "version_0")
    steps = [(row["step"], row["epoch"]) for row in rows if row["val_step_only"]]
    epoch_rows = [(row["step"], row["epoch"]) for row in rows if row["val_both_epoch"]]
    test_rows = [(row["step"], row["epoch"]) for row in rows if row["test_acc"]]
    return steps, epoch_rows, test_rows
