"""Timer and LambdaCallback: Lightning's arguments, and their effect in two-rank runs."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
from models import Classifier, loader
from pytorch_lightning.callbacks import Timer as LightningTimer

import raylight as pl
from raylight.callbacks import LambdaCallback, Timer
from raylight.shared.config import MisconfigurationException


class Slow(Classifier):
    """Each training step takes at least 20 ms, so a 1 ms limit is spent by the first check."""

    def training_step(self, batch, batch_idx):
        time.sleep(0.02)
        return super().training_step(batch, batch_idx)


def _trainer(callbacks: list, max_epochs: int = 3) -> pl.Trainer:
    return pl.Trainer(
        num_workers=2,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )


# ---- Timer ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "duration",
    ["01:02:03:04", {"days": 1, "hours": 2, "minutes": 3, "seconds": 4}],
)
def test_timer_durations_as_lightning_reads_them(duration):
    expected = timedelta(days=1, hours=2, minutes=3, seconds=4).total_seconds()
    assert Timer(duration)._duration == LightningTimer(duration)._duration == expected
    assert Timer(timedelta(minutes=5)).time_remaining() == 300.0


def test_timer_bad_arguments():
    with pytest.raises(MisconfigurationException, match="Expected a string in the format"):
        Timer("1:2:3")
    with pytest.raises(MisconfigurationException, match="Possible choices are: step, epoch"):
        Timer(interval="batch")
    with pytest.raises(ValueError, match="not a valid RunningStage"):
        Timer().time_elapsed("training")


def test_timer_state_carries_training_time():
    timer = Timer(duration={"seconds": 10})
    timer._start_time["train"], timer._end_time["train"] = 100.0, 104.0
    state = timer.state_dict()
    assert state["time_elapsed"]["train"] == 4.0 and state["time_elapsed"]["test"] == 0
    resumed = Timer(duration={"seconds": 10})
    resumed.load_state_dict(state)
    assert resumed.time_elapsed("train") == 4.0 and resumed.time_remaining() == 6.0


def test_timer_decides_with_rank_zeros_clock_from_fit_start():
    broadcasts = []

    def broadcast(obj, src=0):
        broadcasts.append((obj, src))
        return obj if src == 0 else None

    trainer = SimpleNamespace(
        should_stop=False, is_global_zero=True, strategy=SimpleNamespace(broadcast=broadcast)
    )
    Timer(duration={"hours": 1}).on_fit_start(trainer, None)
    assert not trainer.should_stop
    # A limit of zero is spent before training starts (Lightning then runs no epoch).
    Timer(duration={"seconds": 0}, verbose=False).on_fit_start(trainer, None)
    assert trainer.should_stop
    assert broadcasts == [(False, 0), (True, 0)]


@pytest.mark.slow
def test_timer_stops_after_the_first_step_and_lambda_hooks_run(ray_session, tmp_path):
    def record(hook):
        def write(trainer, pl_module, *args):
            with open(tmp_path / f"rank{trainer.global_rank}.jsonl", "a") as file:
                file.write(json.dumps([hook, trainer.current_epoch, trainer.global_step]) + "\n")

        return write

    recorder = LambdaCallback(
        on_fit_start=record("on_fit_start"),
        on_train_epoch_end=record("on_train_epoch_end"),
        on_fit_end=record("on_fit_end"),
    )
    timer = Timer(duration=timedelta(milliseconds=1))
    trainer = _trainer([recorder, timer])
    trainer.fit(Slow(), loader(), loader())
    assert trainer.global_step == 1  # every rank stopped after its first batch
    assert trainer.current_epoch == 1
    # The driver's timer holds rank 0's times.
    assert timer.end_time("train") is not None
    assert 0.02 <= timer.time_elapsed("train") < 60
    assert timer.time_elapsed("validate") > 0  # validation still ran once when stopping
    for rank in (0, 1):
        lines = (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == [
            ["on_fit_start", 0, 0],
            ["on_train_epoch_end", 0, 1],
            ["on_fit_end", 0, 1],
        ]
