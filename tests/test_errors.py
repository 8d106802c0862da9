"""Every user mistake and every worker failure ends in a clear error, never a hang."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
import torch
from models import Classifier, DataModule, loader
from torch.utils.data import TensorDataset

import raylight as pl
from raylight.driver.controller import WorkerFailure
from raylight.driver.placement import ResourcesUnavailable, never_fits
from raylight.shared.config import MisconfigurationException

pytestmark = pytest.mark.slow


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        num_workers=2,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        max_epochs=1,
    )
    return pl.Trainer(**{**defaults, **kwargs})


class FailsOnRankOne(Classifier):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and batch_idx == 2:
            raise ValueError("bad batch on purpose")
        return super().training_step(batch, batch_idx)


def test_user_error_names_rank_hook_and_batch_and_frees_the_other_rank(ray_session):
    # Rank 0 is blocked in the next all-reduce when rank 1 raises; with a 10-minute
    # process-group timeout, only the driver tearing the group down can end this quickly.
    trainer = _trainer(process_group_timeout_s=600)
    started = time.monotonic()
    with pytest.raises(ValueError, match="bad batch on purpose") as info:
        trainer.fit(FailsOnRankOne(), loader())
    assert time.monotonic() - started < 60
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "rank 1 raised ValueError in training_step (epoch 0, batch 2)" in notes
    assert "test_errors.py" in notes and "bad batch on purpose" in notes  # the rank's traceback
    assert trainer._group is None or not trainer._group.actors


class ExitsHard(Classifier):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and batch_idx == 1:
            os._exit(1)
        return super().training_step(batch, batch_idx)


def test_killed_worker_fails_fit_within_30_seconds(ray_session):
    trainer = _trainer(process_group_timeout_s=600)
    started = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"rank 1 .* died during epoch 0") as info:
        trainer.fit(ExitsHard(), loader())
    assert time.monotonic() - started < 30
    assert info.value.rank == 1


class HoldsALock(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


class DataModuleWithLock(DataModule):
    def __init__(self) -> None:
        super().__init__()
        self.guard = {"inner": threading.Lock()}


def test_unpicklable_module_attribute_is_named(ray_session):
    with pytest.raises(MisconfigurationException, match=r"HoldsALock\.lock .*cannot be pickled"):
        _trainer().fit(HoldsALock(), loader())


def test_unpicklable_datamodule_attribute_is_named(ray_session):
    with pytest.raises(MisconfigurationException, match=r"guard\['inner'\].*cannot be pickled"):
        _trainer().fit(Classifier(), datamodule=DataModuleWithLock())


class BadOptimizers(Classifier):
    def configure_optimizers(self):
        return "adam"


def test_bad_configure_optimizers_return(ray_session):
    with pytest.raises(MisconfigurationException, match="configure_optimizers returned str"):
        _trainer().fit(BadOptimizers(), loader())


class NoLoader(Classifier):
    pass


def test_missing_train_dataloader_fails_before_starting_workers():
    trainer = _trainer()
    with pytest.raises(
        MisconfigurationException, match="No `train_dataloader\\(\\)` method defined"
    ):
        trainer.fit(NoLoader())
    assert trainer._group is None  # checked on the driver: no worker was started


class ReturnsAString(Classifier):
    def training_step(self, batch, batch_idx):
        return "loss"


class ReturnsDictWithoutLoss(Classifier):
    def training_step(self, batch, batch_idx):
        return {"value": torch.tensor(1.0)}


@pytest.mark.parametrize(
    ("model_cls", "message"),
    [
        (ReturnsAString, "training_step returned a str"),
        (ReturnsDictWithoutLoss, "without a 'loss' key"),
    ],
)
def test_training_step_must_return_a_loss(ray_session, model_cls, message):
    with pytest.raises(MisconfigurationException, match=message) as info:
        _trainer().fit(model_cls(), loader())
    assert "in training_step" in "\n".join(info.value.__notes__)


def test_gpus_on_a_cpu_cluster_fail_fast_and_list_the_cluster(ray_session):
    with pytest.warns(DeprecationWarning, match="gpus"):
        trainer = pl.Trainer(gpus=1, enable_progress_bar=False)
    started = time.monotonic()
    with pytest.raises(
        ResourcesUnavailable, match=r"needs \{.*'GPU': 1.0.*\}.*the cluster has \{'CPU': 4.0\}"
    ):
        trainer.fit(Classifier(), loader())
    assert time.monotonic() - started < 10


def test_too_many_workers_wait_is_bounded(ray_session):
    trainer = _trainer(num_workers=2, resources_per_worker={"CPU": 3}, placement_timeout_s=2)
    with pytest.raises(
        ResourcesUnavailable, match="needs .*'CPU': 3.0.* per worker x 2.*cluster has"
    ):
        trainer.fit(Classifier(), loader())


def test_a_request_is_hopeless_only_beyond_what_an_autoscaler_could_add():
    gpu_worker = {"CPU": 1.0, "GPU": 1.0}
    cpu_head = {"CPU": 4.0}
    # No autoscaler: judged by the nodes there are.
    assert never_fits(gpu_worker, 2, cpu_head, {}, autoscaling=False)
    assert not never_fits({"CPU": 1.0}, 4, cpu_head, {}, autoscaling=False)
    # An autoscaler whose node types allow 4 GPUs: 2 may come, 8 never.
    allowed = {"CPU": 20.0, "GPU": 4.0}
    assert not never_fits(gpu_worker, 2, cpu_head, allowed, autoscaling=True)
    assert never_fits(gpu_worker, 8, cpu_head, allowed, autoscaling=True)
    # An autoscaler with unknown limits (a `ray up` cluster): the bounded wait decides.
    assert not never_fits(gpu_worker, 8, cpu_head, {}, autoscaling=True)


def test_the_tests_cluster_has_no_autoscaler_that_adds_nodes(ray_session):
    from raylight.driver.placement import autoscaler_ceiling, autoscaler_running

    assert autoscaler_ceiling() == {}
    assert autoscaler_running() is False


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (dict(max_epochs=-5), "max_epochs=-5"),
        (dict(limit_val_batches=2.5), "limit_val_batches=2.5"),
        (dict(num_workers=0), "num_workers=0"),
        (dict(precision="8-true"), "precision='8-true'"),
        (dict(strategy="deepspeed"), "strategy='deepspeed'"),
        (dict(precision="16-mixed"), "needs GPUs"),
    ],
)
def test_flags_out_of_range(flags, message):
    with pytest.raises(MisconfigurationException, match=message.replace("(", r"\(")):
        pl.Trainer(**flags)


def test_ray_address_pointing_to_nothing_fails_in_seconds(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = (
        "import raylight as pl\n"
        "from models import Classifier, loader\n"
        "pl.Trainer(logger=False, enable_checkpointing=False).fit(Classifier(), loader())\n"
    )
    env = {
        **os.environ,
        "RAY_ADDRESS": f"127.0.0.1:{port}",
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - started < 60
    assert result.returncode != 0
    assert f"RAY_ADDRESS='127.0.0.1:{port}' points to no reachable Ray cluster" in result.stderr


# ---- fits that would otherwise do nothing without a word ----------------------------------------
@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (dict(max_epochs=0), "`max_epochs=0` reached."),
        (dict(max_steps=0), "`max_steps=0` reached."),
        (dict(limit_train_batches=0), "No training batches"),
    ],
)
def test_a_fit_with_nothing_to_do_says_so_and_starts_no_worker(flags, reason, capsys):
    model = Classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(**flags)
    trainer.fit(model, loader())
    assert f"`Trainer.fit` stopped: {reason}" in capsys.readouterr().err
    assert trainer._group is None and trainer._board is None  # no worker, no actor
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class NoOptimizer(Classifier):
    def configure_optimizers(self):
        return None


@pytest.mark.parametrize(
    ("model_cls", "data", "warning", "steps"),
    [
        (Classifier, dict(dataset=TensorDataset(torch.zeros(0, 8), torch.zeros(0).long())),
         "Total length of `DataLoader` across ranks is zero", 0),
        (Classifier, dict(batch_size=100, drop_last=True),  # 64 samples per rank, no batch
         "Total length of `DataLoader` across ranks is zero", 0),
        (NoOptimizer, {}, "`LightningModule.configure_optimizers` returned `None`, this fit "
         "will run with no optimizer", 0),
    ],
)  # fmt: skip
def test_lightnings_warnings_for_fits_that_train_nothing(
    ray_session, model_cls, data, warning, steps
):
    trainer = _trainer(max_epochs=2)
    with pytest.warns(UserWarning, match=re.escape(warning)):
        trainer.fit(model_cls(), loader(**data))
    assert trainer.global_step == steps


def test_a_second_fit_after_max_epochs_does_nothing_and_says_so(ray_session, capsys):
    trainer = _trainer(max_epochs=1)
    model = Classifier()
    trainer.fit(model, loader())
    assert trainer.current_epoch == 1 and trainer.global_step == 4
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, loader())
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in capsys.readouterr().err
    assert trainer.global_step == 4
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
