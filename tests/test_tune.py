"""Ray Tune sweeps whose trials are distributed Trainers, on the tests' real Ray cluster."""

from __future__ import annotations

import csv
import glob
import os
import sys
import threading
import time

import models
import pytest
import ray
import torch
from models import Classifier, DataModule
from ray import cloudpickle, tune
from ray.tune.error import TuneError

import raylight as pl
from raylight.shared import sharded
from raylight.tune import CHECKPOINT_NAME, resources

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _ship_test_code_by_value():
    """Tune's trial actors import the trainable; these test modules are not on their path."""
    modules = [sys.modules[__name__], models]
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    yield
    for module in modules:
        cloudpickle.unregister_pickle_by_value(module)


def test_resources_reserve_the_driver_and_each_worker():
    factory = resources(num_workers=2, cpus_per_worker=2, resources_per_worker={"node_1": 1})
    assert factory.bundles == [{"CPU": 1.0}] + [{"CPU": 2.0, "node_1": 1}] * 2
    assert resources(num_workers=1, use_gpu=True).bundles[1] == {"CPU": 1.0, "GPU": 1.0}


def _trial_trainer(**flags):
    """A Trainer for a trial: quiet, and without a logger unless the test asks for one."""
    return pl.Trainer(
        **{"logger": False, "enable_progress_bar": False, "enable_model_summary": False, **flags}
    )


def _train(config):
    trainer = _trial_trainer(
        num_workers=2,
        max_epochs=2,
        # Its own 2 workers beside the trial's 3 CPUs would not fit: asking for them fails
        # within this bound. Not shorter: on a loaded machine a worker takes over 10 s to start.
        placement_timeout_s=45,
    )
    trainer.fit(Classifier(lr=config["lr"]), datamodule=DataModule(n=64))


class _ReservationSampler(threading.Thread):
    """Samples the cluster's resources and placement groups until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[dict, dict, dict]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            table = ray.util.placement_group_table()
            self.samples.append((ray.cluster_resources(), ray.available_resources(), table))
            self.stopped.wait(0.1)


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    """A sweep of two 2-worker trials, the cluster's reservations sampled while it runs."""
    storage_path = tmp_path_factory.mktemp("sweep")
    tuner = tune.Tuner(
        tune.with_resources(_train, resources(num_workers=2)),  # 3 of the cluster's 4 CPUs
        param_space={"lr": tune.grid_search([0.05, 0.2])},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
        run_config=tune.RunConfig(storage_path=str(storage_path), name="sweep"),
    )
    sampler = _ReservationSampler()
    sampler.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(storage_path)
            results = tuner.fit()
    finally:
        sampler.stopped.set()
        sampler.join()
    return results, sampler.samples, storage_path


def test_a_sweep_reports_metrics_and_checkpoints_of_distributed_trials(sweep):
    results, _, storage_path = sweep
    assert not results.errors, results.errors
    assert len(results) == 2
    for result in results:
        assert result.metrics["epoch"] == 1 and result.metrics["step"] == 4  # 2 epochs x 2 steps
        assert result.metrics["training_iteration"] == 2  # one report per epoch
        assert "val_loss" in result.metrics and "train_loss" in result.metrics
        with result.checkpoint.as_directory() as folder:
            restored = Classifier.load_from_checkpoint(os.path.join(folder, CHECKPOINT_NAME))
        assert restored.hparams.lr == result.config["lr"]
        assert result.checkpoint.path.startswith(str(storage_path))  # in Tune's storage
    best = results.get_best_result()
    assert best.metrics["val_loss"] == min(r.metrics["val_loss"] for r in results)


def test_trials_never_reserve_more_cpus_than_the_cluster_has(sweep):
    results, samples, _ = sweep
    assert not results.errors, results.errors
    placed = 0
    for total, free, table in samples:
        groups = {key: pg for key, pg in table.items() if pg["state"] == "CREATED"}
        reserved = sum(b.get("CPU", 0.0) for pg in groups.values() for b in pg["bundles"].values())
        assert reserved <= total["CPU"]
        # Only the trials' groups (driver + 2 workers): the Trainers made none of their own.
        assert all(len(pg["bundles"]) == 3 for pg in groups.values()), groups
        for key in groups:
            bundles = [f"CPU_group_{i}_{key}" for i in (1, 2)]
            placed += all(name in total and free.get(name, 0.0) == 0.0 for name in bundles)
    assert placed  # some samples saw a trial's two workers in its bundles 1 and 2


def _mismatched(config):
    pl.Trainer(num_workers=2, max_epochs=1, logger=False, enable_progress_bar=False).fit(
        Classifier(), datamodule=DataModule(n=64)
    )


def test_a_trainer_that_does_not_fit_the_trial_reservation_is_a_clear_error(ray_session, tmp_path):
    tuner = tune.Tuner(
        tune.with_resources(_mismatched, resources(num_workers=1)),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="bad"),
    )
    (result,) = tuner.fit()
    assert result.error is not None
    assert "resources(num_workers=2" in str(result.error)


class FailsOnce(Classifier):
    """Raises in epoch 2 the first time (a marker file remembers); logs the step its fit
    started from."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def on_train_start(self):
        self.start_step = self.trainer.global_step

    def on_train_epoch_start(self):
        self.log("start_step", float(self.start_step))
        if self.current_epoch == 2 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError("the trial's first attempt dies here")


def _fails_once(config):
    trainer = pl.Trainer(
        strategy=config.get("strategy", "ddp"),
        num_workers=2,
        max_epochs=4,
        logger=False,
        enable_progress_bar=False,
    )
    trainer.fit(FailsOnce(config["marker"]), datamodule=DataModule(n=64))


def test_a_restarted_trial_resumes_from_its_last_reported_checkpoint(ray_session, tmp_path):
    tuner = tune.Tuner(
        tune.with_resources(_fails_once, resources(num_workers=2)),
        param_space={"marker": str(tmp_path / "failed-once")},
        run_config=tune.RunConfig(
            storage_path=str(tmp_path), name="restart", failure_config=tune.FailureConfig(1)
        ),
    )
    (result,) = tuner.fit()
    assert result.error is None, result.error
    assert (tmp_path / "failed-once").exists()
    # The second attempt started from the epoch-1 checkpoint (step 4), not from scratch.
    assert result.metrics["start_step"] == 4.0
    assert result.metrics["step"] == 8 and result.metrics["epoch"] == 3


def test_an_fsdp_trial_reports_sharded_checkpoints_and_resumes_from_one(ray_session, tmp_path):
    tuner = tune.Tuner(
        tune.with_resources(_fails_once, resources(num_workers=2)),
        param_space={"marker": str(tmp_path / "failed-once"), "strategy": "fsdp"},
        run_config=tune.RunConfig(
            storage_path=str(tmp_path), name="sharded", failure_config=tune.FailureConfig(1)
        ),
    )
    (result,) = tuner.fit()
    assert result.error is None, result.error
    assert (tmp_path / "failed-once").exists()
    assert result.metrics["start_step"] == 4.0  # resumed from the epoch-1 sharded checkpoint
    assert result.metrics["step"] == 8 and result.metrics["epoch"] == 3
    with result.checkpoint.as_directory() as folder:
        given = os.path.join(folder, CHECKPOINT_NAME)
        assert sharded.is_sharded(given)  # Tune holds the shards, .metadata and meta.pt
        restored = Classifier.load_from_checkpoint(given)
        assert sharded.read_full(given)["global_step"] == 8
    assert restored.hparams.lr == Classifier().hparams.lr


def _sweep_trial(config):
    trainer = _trial_trainer(
        num_workers=2,
        max_epochs=4,
    )
    trainer.fit(Classifier(lr=config["lr"]), datamodule=DataModule(n=64))


def test_an_asha_sweep_stops_weak_trials_early(ray_session, tmp_path):
    # Good learning rates first: the trials run one at a time (3 of the 4 CPUs each), so the
    # weak ones meet the good ones' results at ASHA's rungs and are stopped there.
    tuner = tune.Tuner(
        tune.with_resources(_sweep_trial, resources(num_workers=2)),
        param_space={"lr": tune.grid_search([0.5, 0.3, 0.001, 0.0001])},
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            scheduler=tune.schedulers.ASHAScheduler(max_t=4, grace_period=1, reduction_factor=2),
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha"),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    iterations = {r.config["lr"]: r.metrics["training_iteration"] for r in results}
    assert all(n >= 1 for n in iterations.values())  # every trial reported
    assert iterations[0.5] == 4  # the first trial ran to the end
    assert min(iterations[0.001], iterations[0.0001]) < 4  # a weak one was stopped early
    best = results.get_best_result()
    assert best.config["lr"] in (0.5, 0.3)
    assert best.metrics["val_loss"] == min(r.metrics["val_loss"] for r in results)


class LogsStartStep(Classifier):
    def training_step(self, batch, batch_idx):
        time.sleep(0.2)  # slow enough for the two trials to overlap and meet at PBT's checks
        return super().training_step(batch, batch_idx)

    def on_train_start(self):
        self.start_step = self.trainer.global_step

    def on_train_epoch_start(self):
        self.log("start_step", float(self.start_step))


def _pbt_trial(config):
    trainer = _trial_trainer(
        num_workers=1,
        max_epochs=6,
    )
    trainer.fit(LogsStartStep(lr=config["lr"]), datamodule=DataModule(n=64))


def test_pbt_restores_a_trial_from_another_trials_checkpoint(ray_session, tmp_path):
    scheduler = tune.schedulers.PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=2,
        quantile_fraction=0.5,  # of 2 trials, the worse one takes the better one's checkpoint
        hyperparam_mutations={"lr": [0.3, 0.5]},
    )
    tuner = tune.Tuner(
        tune.with_resources(_pbt_trial, resources(num_workers=1)),  # 2 trials side by side
        param_space={"lr": tune.grid_search([0.5, 0.00001])},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="pbt"),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    # A restored trial's fit started at the step of the checkpoint it was given, and went on
    # to the end (6 epochs of 4 steps).
    restored = [r for r in results if r.metrics["start_step"] > 0]
    assert restored, [r.metrics for r in results]
    assert all(r.metrics["step"] == 24 for r in results)


def _validates_twice_per_epoch(config):
    trainer = _trial_trainer(
        num_workers=1,
        max_epochs=2,
        val_check_interval=0.5,  # 4 batches an epoch: validations after batches 2 and 4
        logger=pl.loggers.CSVLogger(config["logs"]),
    )
    trainer.fit(Classifier(lr=0.5), datamodule=DataModule(n=64))


def test_every_validation_run_is_its_own_tune_report(ray_session, tmp_path):
    tuner = tune.Tuner(
        tune.with_resources(_validates_twice_per_epoch, resources(num_workers=1)),
        param_space={"logs": str(tmp_path / "logs")},
        run_config=tune.RunConfig(storage_path=str(tmp_path / "storage"), name="val-check"),
    )
    (result,) = tuner.fit()
    assert result.error is None, result.error
    reports = result.metrics_dataframe
    assert list(reports["epoch"]) == [0, 0, 1, 1]
    assert list(reports["step"]) == [2, 4, 6, 8]
    # Each report carries the loss its own validation logged (the CSV logger's val rows).
    (metrics_csv,) = glob.glob(str(tmp_path / "logs" / "**" / "metrics.csv"), recursive=True)
    with open(metrics_csv) as file:
        logged = [float(row["val_loss"]) for row in csv.DictReader(file) if row["val_loss"]]
    assert list(reports["val_loss"]) == pytest.approx(logged)
    assert len(set(logged)) == 4
    # The last report's checkpoint is the one taken at the last validation (step 8).
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(os.path.join(folder, CHECKPOINT_NAME), weights_only=False)
    assert saved["global_step"] == 8


class MarksLaterEpochs(Classifier):
    """Logs val_loss only, and leaves a file when an epoch after the first one starts."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def on_train_epoch_start(self):
        if self.current_epoch > 0:
            open(self.marker, "w").close()


def _logs_val_loss_only(config):
    trainer = _trial_trainer(
        num_workers=1,
        max_epochs=3,
    )
    trainer.fit(MarksLaterEpochs(config["marker"]), datamodule=DataModule(n=64))


@pytest.mark.parametrize("where", ["TuneConfig", "scheduler"])
def test_a_sweep_metric_that_is_never_logged_stops_the_sweep_at_the_first_report(
    ray_session, tmp_path, where
):
    # Tune's own strict metric check names the metric, who wants it, and what was reported;
    # raylight adds nothing.
    if where == "TuneConfig":
        tune_config, wanted_by = tune.TuneConfig(metric="val_acc", mode="max"), "tune.TuneConfig()"
    else:
        asha = tune.schedulers.ASHAScheduler(metric="val_acc", mode="max")
        tune_config, wanted_by = tune.TuneConfig(scheduler=asha), "AsyncHyperBandScheduler"
    marker = tmp_path / "second-epoch-started"
    tuner = tune.Tuner(
        tune.with_resources(_logs_val_loss_only, resources(num_workers=1)),
        param_space={"marker": str(marker)},
        tune_config=tune_config,
        run_config=tune.RunConfig(storage_path=str(tmp_path / "storage"), name="no-metric"),
    )
    with pytest.raises(TuneError) as raised:
        tuner.fit()
    message = str(raised.value)
    assert f"`val_acc` that `{wanted_by}` expects" in message
    assert "'val_loss':" in message and "'training_iteration': 1," in message
    assert not marker.exists()  # the trial stopped at its first report, after epoch 0


def _three_epochs(config):
    with open(os.path.join(config["cwds"], f"{config['lr']}.txt"), "w") as file:
        file.write(os.getcwd())
    trainer = _trial_trainer(
        num_workers=1,
        max_epochs=3,
        max_failures=1,
        recovery_every_n_train_steps=2,  # a recovery checkpoint as well as the default one
        logger=True,
    )
    trainer.fit(Classifier(lr=config["lr"]), datamodule=DataModule(n=64))


def test_checkpoints_stay_in_tunes_storage_and_tune_keeps_num_to_keep(ray_session, tmp_path):
    storage_path, cwds = tmp_path / "storage", tmp_path / "cwds"
    cwds.mkdir()
    tuner = tune.Tuner(
        tune.with_resources(_three_epochs, resources(num_workers=1)),  # 2 trials side by side
        param_space={"lr": tune.grid_search([0.1, 0.2]), "cwds": str(cwds)},
        run_config=tune.RunConfig(
            storage_path=str(storage_path),
            name="keep",
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    for result in results:
        assert result.metrics["training_iteration"] == 3  # 3 reports, each with a checkpoint
        assert result.checkpoint.path.endswith("checkpoint_000002")
        kept = glob.glob(os.path.join(result.path, "checkpoint_*"))
        assert len(kept) == 2
        # The Trainer's own files are in the trial's folder too: its ModelCheckpoint's, the
        # recovery checkpoint (for Trainer(max_failures)) and the logs.
        assert glob.glob(os.path.join(result.path, "lightning_logs", "*", "checkpoints", "*.ckpt"))
        assert glob.glob(os.path.join(result.path, "recovery", "*.ckpt"))
    trial_cwds = [(cwds / f"{lr}.txt").read_text() for lr in (0.1, 0.2)]
    assert all(os.path.isdir(cwd) for cwd in trial_cwds)
    everywhere = [str(tmp_path), *trial_cwds]
    found = {p for root in everywhere for p in glob.glob(f"{root}/**/*.ckpt", recursive=True)}
    outside = sorted(p for p in found if not p.startswith(str(storage_path) + os.sep))
    assert found and not outside
