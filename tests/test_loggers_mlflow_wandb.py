"""MLFlowLogger against a real MLflow tracking server on loopback, and WandbLogger offline:
Lightning's arguments, one run per logger across Trainer calls and worker restarts, and
what reaches the run read back through MlflowClient and from wandb's own run file."""

from __future__ import annotations

import contextlib
import csv
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from argparse import Namespace
from pathlib import Path

import cloudpickle
import pytest
import torch
from models import Classifier, loader, make_dataset

import raylight as pl
from raylight.driver import logger_relay
from raylight.loggers import CSVLogger, MLFlowLogger, WandbLogger
from raylight.rank.logger_view import rank_views
from raylight.shared.config import MisconfigurationException

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")
lightning_loggers = pytest.importorskip("pytorch_lightning.loggers")


# ---- the MLflow tracking server --------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free loopback port with a SQLite store; yields its URI."""
    folder = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    command += ["--default-artifact-root", str(folder / "artifacts")]
    # The server's job runner is a second process pool the tests do not use.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(folder / "server.log", "wb") as log:
        # Its own session, so that ending it ends the workers it starts, and nothing else.
        server = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
            start_new_session=True,
        )
        uri = f"http://127.0.0.1:{port}"
        try:
            _wait_for(uri, server, folder / "server.log")
            yield uri
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def _wait_for(uri: str, server: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not up after {timeout_s}s:\n{log.read_text()[-3000:]}")


def _runs(uri: str, experiment_name: str) -> list:
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """A metric's ``(step, value)`` points, in step order (a step sent twice shows twice)."""
    client = mlflow.tracking.MlflowClient(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _csv_series(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a CSVLogger's metrics.csv, in step order."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(Path(log_dir) / "metrics.csv") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key != "step" and value != "":
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return {key: sorted(points) for key, points in series.items()}


def _trainer(root: Path, loggers: list, **kwargs) -> pl.Trainer:
    options = dict(
        num_workers=2,
        max_epochs=2,
        default_root_dir=root,
        logger=loggers,
        log_every_n_steps=1,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**options, **kwargs})


# ---- Lightning's arguments -------------------------------------------------------------------
def _parameters(cls: type) -> list[tuple[str, object, object]]:
    signature = inspect.signature(cls.__init__)
    return [(p.name, p.default, p.kind) for p in list(signature.parameters.values())[1:]]


def test_arguments_are_lightnings():
    assert _parameters(WandbLogger) == _parameters(lightning_loggers.WandbLogger)
    # checkpoint_path_prefix is the newer Lightning's, after the installed one's arguments.
    ours = _parameters(MLFlowLogger)
    assert ours[:-1] == _parameters(lightning_loggers.MLFlowLogger)
    assert ours[-1][:2] == ("checkpoint_path_prefix", "")


def test_log_model_and_watch_are_refused_naming_what_to_do(tmp_path):
    for log_model in (True, "all"):
        with pytest.raises(MisconfigurationException, match=r"log_model=.*log_artifact"):
            MLFlowLogger(save_dir=str(tmp_path), log_model=log_model)
        with pytest.raises(MisconfigurationException, match=r"log_model=.*log_artifact"):
            WandbLogger(save_dir=tmp_path, log_model=log_model)
    logger = WandbLogger(save_dir=tmp_path, offline=True, experiment=object())
    with pytest.raises(MisconfigurationException, match=r"watch\(model\).*experiment\.log"):
        logger.watch(Classifier())


# ---- MLflow ----------------------------------------------------------------------------------
def test_mlflow_logs_what_lightnings_logger_logs(mlflow_server, monkeypatch):
    """The same calls through Lightning's logger and ours give the same params, metrics and
    status; ours keeps parameter values up to MLflow's limit, where Lightning cuts at 250."""
    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)  # Lightning's global
    long = "v" * 400
    params = {"a": {"b": 1}, "ns": Namespace(x=2), "dl": [{"p": 1}], "t": (1, 2), "long": long}
    results = {}
    for name, cls in (("lightning", lightning_loggers.MLFlowLogger), ("raylight", MLFlowLogger)):
        logger = cls(experiment_name=f"compare-{name}", tracking_uri=mlflow_server, prefix="pre")
        logger.log_hyperparams(params)
        with pytest.warns(RuntimeWarning, match="Replacing pre-bad key! with pre-bad key"):
            logger.log_metrics({"bad key!": 1.0, "ok": 2.0, "text": "dropped"}, step=3)
        logger.log_metrics({"ok": 3.0})
        logger.finalize("failed")
        (run,) = _runs(mlflow_server, f"compare-{name}")
        assert run.info.run_id == logger.run_id == logger.version
        assert logger.name == logger.experiment_id == run.info.experiment_id
        assert logger.save_dir is None  # a tracking server, not a local folder
        histories = {key: _history(mlflow_server, run.info.run_id, key) for key in run.data.metrics}
        results[name] = (dict(run.data.params), histories, run.info.status)
    lightning, raylight = results["lightning"], results["raylight"]
    assert lightning[0].pop("long") == long[:250] and raylight[0].pop("long") == long
    assert raylight == lightning
    assert raylight[0] == {"a/b": "1", "ns/x": "2", "dl/0/p": "1", "t": "(1, 2)"}
    assert raylight[1] == {"pre-bad key": [(3, 1.0)], "pre-ok": [(0, 3.0), (3, 2.0)]}
    assert raylight[2] == "FAILED"


def test_mlflow_skips_the_rows_a_restarted_fit_sends_again(mlflow_server):
    logger = MLFlowLogger(experiment_name="replayed", tracking_uri=mlflow_server)
    for step in range(6):
        logger.log_metrics({"loss": float(step)}, step)
    logger.log_metrics({"val": 1.0}, 5)
    logger.drop_rows_from(3)  # the fit resumes from a checkpoint at step 3
    for step in range(3, 8):
        logger.log_metrics({"loss": float(step)}, step)
        if step == 4:
            logger.log_metrics({"other": 2.0}, step)  # a row not sent before: it goes
        if step == 5:
            logger.log_metrics({"val": 1.0}, step)
    run_id = logger.run_id
    assert _history(mlflow_server, run_id, "loss") == [(s, float(s)) for s in range(8)]
    assert _history(mlflow_server, run_id, "val") == [(5, 1.0)]
    assert _history(mlflow_server, run_id, "other") == [(4, 2.0)]


def test_mlflow_file_store_default(tmp_path, monkeypatch):
    """Without a tracking URI the run goes to ``file:<save_dir>``, as in Lightning; the mlflow
    that refuses its file store gets an error naming what to pass instead."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    logger = MLFlowLogger(tracking_uri=None, save_dir=str(tmp_path / "runs"))
    assert logger.save_dir == str(tmp_path / "runs")
    with pytest.raises(MisconfigurationException, match=r"tracking_uri='sqlite:///mlflow.db'"):
        logger.log_metrics({"x": 1.0}, step=2)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = MLFlowLogger(tracking_uri=None, save_dir=str(tmp_path / "runs"))
    logger.log_metrics({"x": 1.0}, step=2)
    logger.finalize("success")
    run = logger.experiment.get_run(logger.run_id)
    assert (run.data.metrics, run.info.status) == ({"x": 1.0}, "FINISHED")
    assert (tmp_path / "runs" / logger.experiment_id / logger.run_id).is_dir()


class TagsEachEpoch(Classifier):
    """Rank 0 tags the run through ``self.logger.experiment`` (the MlflowClient's method)."""

    def on_train_epoch_end(self):
        self.logger.experiment.set_tag(self.logger.run_id, f"epoch_{self.current_epoch}", "seen")


@pytest.mark.slow
def test_mlflow_one_run_for_a_fit_and_a_later_test(ray_session, mlflow_server, tmp_path):
    logger = MLFlowLogger(experiment_name="fit-and-test", tracking_uri=mlflow_server)
    csv_logger = CSVLogger(tmp_path)
    trainer = _trainer(tmp_path, [logger, csv_logger])
    model = TagsEachEpoch()
    trainer.fit(model, loader(), loader(make_dataset(32, seed=1)))
    (run,) = _runs(mlflow_server, "fit-and-test")
    assert run.info.status == "FINISHED"
    trainer.test(model, loader(make_dataset(32, seed=1)))
    (run,) = _runs(mlflow_server, "fit-and-test")  # the test logged to the fit's run
    assert run.info.status == "FINISHED" and run.info.run_id == logger.run_id
    assert run.data.params == {"features": "8", "classes": "3", "lr": "0.1"}
    assert run.data.tags["epoch_0"] == run.data.tags["epoch_1"] == "seen"
    expected = _csv_series(csv_logger.log_dir)
    assert {"train_loss", "val_loss", "test_acc", "epoch"} <= set(expected)
    assert set(run.data.metrics) == set(expected)
    for key, points in expected.items():
        assert _history(mlflow_server, run.info.run_id, key) == points, key
    assert [step for step, _ in expected["train_loss"]] == list(range(8))


class DiesOnce(Classifier):
    """Rank 1 exits hard at ``step``, the first time only (a marker file remembers)."""

    def __init__(self, marker: str, step: int) -> None:
        super().__init__()
        self.marker, self.die_at = marker, step

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.trainer.global_step == self.die_at:
            if not os.path.exists(self.marker):
                Path(self.marker).write_text("died\n")
                os._exit(1)
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_mlflow_one_run_through_a_worker_failure(ray_session, mlflow_server, tmp_path):
    logger = MLFlowLogger(experiment_name="failure", tracking_uri=mlflow_server)
    csv_logger = CSVLogger(tmp_path)
    every_2_epochs = pl.callbacks.ModelCheckpoint(every_n_epochs=2, save_top_k=-1)
    trainer = _trainer(
        tmp_path,
        [logger, csv_logger],
        max_epochs=4,
        limit_train_batches=2,  # two steps an epoch
        max_failures=1,
        callbacks=[every_2_epochs],
    )
    # Steps 4-5 reach the loggers in epoch 2; the death in epoch 3 sends the fit back to
    # the checkpoint at step 4, so they are logged a second time.
    with pytest.warns(UserWarning, match=r"failure 1 of the run.*\(global step 4\)"):
        trainer.fit(DiesOnce(str(tmp_path / "marker"), step=6), loader())
    assert (tmp_path / "marker").read_text() == "died\n"
    (run,) = _runs(mlflow_server, "failure")
    assert run.info.status == "FINISHED"
    train_loss = _history(mlflow_server, run.info.run_id, "train_loss")
    assert [step for step, _ in train_loss] == list(range(8))  # each step once
    expected = _csv_series(csv_logger.log_dir)
    for key, points in expected.items():
        assert _history(mlflow_server, run.info.run_id, key) == points, key


# ---- wandb, offline --------------------------------------------------------------------------
@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb offline and quiet, with its settings, cache and data under ``tmp_path``: the
    user's own wandb files and settings are never read or written."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    yield
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()  # ends wandb's service process and clears its address from the env


def _records(run_file: Path) -> list:
    """The records of a ``.wandb`` run file, parsed with wandb's protobuf. The file is a
    LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks (checksum, length,
    type) that FULL, or FIRST..LAST, spell out a record."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        if 32768 - offset % 32768 < 7:  # a block's tail too short for a chunk is padding
            offset += 32768 - offset % 32768
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _logged(save_dir: Path) -> tuple[list[dict], dict]:
    """The history rows (without wandb's own ``_`` keys) and the config of the one offline
    run under ``save_dir``."""
    import json

    (run_file,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
    # wandb's service writes the file after finish() returns: wait for the run's exit record.
    deadline = time.monotonic() + 60
    records = _records(run_file)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{run_file} has no exit record after 60s"
        time.sleep(0.2)
        records = _records(run_file)
    rows, config = [], {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                for i in record.history.item
            }
            rows.append({k: v for k, v in items.items() if not k.startswith("_")})
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            for item in updates:
                config["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return rows, {k: v for k, v in config.items() if not k.startswith("_")}


def test_wandb_logs_what_lightnings_logger_logs(wandb_offline, tmp_path):
    def callable_param():
        return "called"

    params = {"lr": 0.1, "nested": {"a": 1}, "fn": callable_param, "obj": object, "t": (1, 2)}
    results = {}
    for name, cls in (("lightning", lightning_loggers.WandbLogger), ("raylight", WandbLogger)):
        save_dir = tmp_path / name
        save_dir.mkdir()
        logger = cls(save_dir=save_dir, offline=True, project="p", prefix="pre")
        logger.log_hyperparams(params)
        logger.log_metrics({"loss": 1.0}, step=3)
        logger.log_metrics({"loss": 0.5, "acc": 0.75}, step=4)
        logger.log_text("notes", columns=["a"], data=[["x"]], step=5)
        logger.finalize("success")
        assert (logger.name, logger.save_dir) == ("p", str(save_dir))
        assert logger.version == logger.experiment.id
        logger.experiment.finish()
        rows, config = _logged(save_dir)
        # The table is a file of the run's: its path and artifact name are the run's own.
        own = ("/path", "artifact_path")
        rows = [{k: v for k, v in row.items() if not k.endswith(own)} for row in rows]
        results[name] = rows, config
    assert results["raylight"] == results["lightning"]
    rows, config = results["raylight"]
    assert config == {"lr": 0.1, "nested": {"a": 1}, "fn": "called", "obj": "object", "t": [1, 2]}
    assert rows[:2] == [
        {"pre-loss": 1.0, "trainer/global_step": 3},
        {"pre-loss": 0.5, "pre-acc": 0.75, "trainer/global_step": 4},
    ]
    assert rows[2]["pre-notes/_type"] == "table-file" and rows[2]["trainer/global_step"] == 5


class _RecordingRun:
    """Stands in for wandb's Run: keeps the rows ``log`` is given."""

    id, name = "run-id", "run-name"

    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log(self, row: dict) -> None:
        self.logged.append(row)


def test_wandb_skips_the_rows_a_restarted_fit_sends_again(tmp_path):
    run = _RecordingRun()
    logger = WandbLogger(save_dir=tmp_path, experiment=run)
    for step in range(3):
        logger.log_metrics({"loss": float(step)}, step)
    logger.drop_rows_from(1)
    for step in range(1, 4):
        logger.log_metrics({"loss": float(step)}, step)
    assert run.logged == [{"loss": float(s), "trainer/global_step": s} for s in range(4)]


def test_wandb_view_records_rank_zeros_calls_and_refuses_watch(tmp_path):
    """On a rank, ``self.logger`` is a WandbLogger whose run calls and helpers (log_image)
    the driver replays on its run; watch, which would hook the driver's idle copy of the
    model, is refused where it is called."""
    run = _RecordingRun()
    logger = WandbLogger(save_dir=tmp_path, experiment=run)
    trainer = types.SimpleNamespace(is_global_zero=True, _logger_calls=[])
    descriptions = cloudpickle.loads(cloudpickle.dumps(logger_relay.describe([logger])))
    (view,) = rank_views(descriptions, trainer)
    assert isinstance(view, WandbLogger) and view.version == "run-id"
    with pytest.raises(AttributeError, match="no method 'watch'"):
        view.experiment.watch(torch.nn.Linear(1, 1))
    view.experiment.log({"custom": 1.0})
    view.log_image("images", [torch.rand(3, 4, 4)], step=4, caption=["first"])
    assert run.logged == []  # nothing reaches the run until the driver replays the calls
    logger_relay.replay([logger], trainer._logger_calls)
    assert run.logged[0] == {"custom": 1.0}
    (image,) = run.logged[1]["images"]
    assert isinstance(image, wandb.Image) and image._caption == "first"
    assert run.logged[1]["trainer/global_step"] == 4


class LogsThroughTheRun(Classifier):
    """Rank 0 logs through ``self.logger.experiment.log`` (wandb's Run.log) each epoch."""

    def on_train_epoch_end(self):
        self.logger.experiment.log({"from_module": float(self.current_epoch) + 0.5})


@pytest.mark.slow
def test_wandb_offline_fit(ray_session, wandb_offline, tmp_path):
    logger = WandbLogger(offline=True, save_dir=tmp_path, project="p")
    csv_logger = CSVLogger(tmp_path)
    trainer = _trainer(tmp_path, [logger, csv_logger])
    trainer.fit(LogsThroughTheRun(), loader(), loader(make_dataset(32, seed=1)))
    run_id = logger.version
    logger.experiment.finish()
    rows, config = _logged(tmp_path)
    assert config == {"features": 8, "classes": 3, "lr": 0.1}
    expected = _csv_series(csv_logger.log_dir)
    assert [step for step, _ in expected["train_loss"]] == list(range(8))
    for key, points in expected.items():
        logged = [(row["trainer/global_step"], row[key]) for row in rows if key in row]
        assert sorted(logged) == points, key
    assert [row["from_module"] for row in rows if "from_module" in row] == [0.5, 1.5]
    (run_folder,) = tmp_path.glob("wandb/offline-run-*")  # one run, the logger's
    assert run_folder.name.endswith(f"-{run_id}")
