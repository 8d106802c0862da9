"""Several Trainers in one script share the cluster: idle ones make room, busy ones are named."""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray
from models import Classifier, loader

import raylight as pl
from raylight.driver.placement import ResourcesUnavailable

pytestmark = pytest.mark.slow


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_a_new_trainer_gets_the_workers_an_idle_earlier_one_held(ray_session, capfd, tmp_path):
    pretrain, model = _trainer(num_workers=3), Classifier()  # 3 of the session's 4 CPUs
    pretrain.fit(model, loader())
    assert pretrain._holds_workers()
    finetune = _trainer(num_workers=2, placement_timeout_s=30)
    finetune.fit(Classifier(), loader())  # before: a 60 s wait, then ResourcesUnavailable
    assert finetune.global_step == 4
    stderr = capfd.readouterr().err
    assert (
        "stopped the idle workers of 1 earlier Trainer(s) of this script (3 workers holding "
        "{'CPU': 3.0}) to make room for this one" in stderr
    )
    assert not pretrain._holds_workers() and finetune._holds_workers()
    with pytest.raises(RuntimeError, match="stopped when another Trainer in this script needed"):
        pretrain.save_checkpoint(tmp_path / "late.ckpt")
    # The earlier Trainer starts workers again when it is used again, making room in turn.
    results = pretrain.test(model, loader(), verbose=False)
    assert 0.0 <= results[0]["test_acc"] <= 1.0
    assert pretrain._holds_workers() and not finetune._holds_workers()


class WaitsForRelease(Classifier):
    def __init__(self, release: str) -> None:
        super().__init__()
        self.release = release

    def training_step(self, batch, batch_idx):
        deadline = time.monotonic() + 120
        while not os.path.exists(self.release) and time.monotonic() < deadline:
            time.sleep(0.1)
        return super().training_step(batch, batch_idx)


@ray.remote(num_cpus=1)
class OtherJob:
    def ready(self) -> bool:
        return True


def test_resources_held_elsewhere_are_named_in_plain_words(ray_session, tmp_path):
    release = tmp_path / "release"
    other_job = OtherJob.remote()  # 1 CPU held outside this script's Trainers
    ray.get(other_job.ready.remote())
    running = _trainer(num_workers=2)  # 2 CPUs held by a Trainer in the middle of its fit
    errors: list[BaseException] = []

    def fit_in_background() -> None:
        try:
            running.fit(WaitsForRelease(str(release)), loader())
        except BaseException as error:  # reported below, on the test's thread
            errors.append(error)

    thread = threading.Thread(target=fit_in_background)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not running._holds_workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running._holds_workers() and running._busy
        with pytest.raises(ResourcesUnavailable) as info:
            _trainer(num_workers=2, placement_timeout_s=3).fit(Classifier(), loader())
    finally:
        release.touch()
        thread.join(timeout=120)
        ray.kill(other_job)
    assert not errors, errors
    message = str(info.value)
    assert "needs {'CPU': 1.0} per worker x 2" in message
    assert "It has {'CPU': 4.0} in all, {'CPU': 1.0} free." in message
    assert "{'CPU': 2.0} by this script's other Trainers, which are running" in message
    assert "{'CPU': 1.0} by other jobs or tasks on the cluster" in message
    assert "_group_" not in message  # no placement-group internals
    assert running.global_step == 4  # the running Trainer was left alone
