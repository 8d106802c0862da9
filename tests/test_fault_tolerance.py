"""Fault recovery on one node: a rank that dies is replaced, the run resumes from its latest
committed checkpoint, and the result equals a run that never failed."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
from models import Classifier, loader

import raylight as pl
from raylight.driver.controller import FailureLimitExceeded

pytestmark = pytest.mark.slow


class DiesOnce(Classifier):
    """Rank ``rank`` exits hard at ``step``, the first time only (a marker file remembers)."""

    def __init__(self, marker: str, step: int, rank: int = 1, always: bool = False) -> None:
        super().__init__()
        self.marker, self.die_at, self.die_rank, self.always = marker, step, rank, always

    def training_step(self, batch, batch_idx):
        if self.global_rank == self.die_rank and self.trainer.global_step == self.die_at:
            if self.always or not os.path.exists(self.marker):
                with open(self.marker, "a") as f:
                    f.write("died\n")
                os._exit(1)
        return super().training_step(batch, batch_idx)


def _trainer(root, **kwargs) -> pl.Trainer:
    options = dict(
        num_workers=2,
        max_epochs=4,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**options, **kwargs})


def _uninterrupted(root) -> dict[str, torch.Tensor]:
    model = Classifier()
    _trainer(root).fit(model, loader())
    return model.state_dict()


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the uninterrupted run, from seed 0."""
    seeds_before = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    pl.seed_everything(0)
    weights = _uninterrupted(tmp_path_factory.mktemp("reference"))
    for name, value in seeds_before.items():  # the hygiene check wants them as they were
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return weights


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_killed_worker_is_replaced_and_the_result_is_exact(
    ray_session, tmp_path, seed, reference
):
    step = int(torch.randint(1, 16, (1,), generator=torch.Generator().manual_seed(seed)))
    pl.seed_everything(0)
    model = DiesOnce(str(tmp_path / "marker"), step=step)  # the reference's initial weights
    trainer = _trainer(tmp_path / "run", max_failures=1)
    with pytest.warns(UserWarning, match="failure 1 of the run"):
        trainer.fit(model, loader())
    assert (tmp_path / "marker").read_text() == "died\n"
    assert trainer.global_step == 16 and trainer.current_epoch == 4
    for name, value in reference.items():
        assert torch.equal(model.state_dict()[name], value), name


class RaisesOnce(Classifier):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.trainer.global_step == 5:
            with open(self.marker, "a") as f:
                f.write("raised\n")
            raise ValueError("a bug in training_step")
        return super().training_step(batch, batch_idx)


def test_a_user_exception_is_not_retried(ray_session, tmp_path):
    trainer = _trainer(tmp_path, max_failures=3)
    with pytest.raises(ValueError, match="a bug in training_step") as info:
        trainer.fit(RaisesOnce(str(tmp_path / "marker")), loader())
    assert (tmp_path / "marker").read_text() == "raised\n"  # one attempt only
    assert any("rank 1 raised ValueError in training_step" in n for n in info.value.__notes__)


def test_exceeding_max_failures_names_each_failure(ray_session, tmp_path):
    trainer = _trainer(tmp_path, max_failures=2)
    model = DiesOnce(str(tmp_path / "marker"), step=5, always=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FailureLimitExceeded, match="failed 3 times") as info:
            trainer.fit(model, loader())
    assert (tmp_path / "marker").read_text() == "died\n" * 3
    assert str(info.value).count("rank 1") == 3


class DiesWhileSaving(Classifier):
    """Rank 0 exits hard in the middle of writing the epoch-1 checkpoint (once)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def on_save_checkpoint(self, checkpoint):
        if self.global_rank == 0 and checkpoint["epoch"] == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)


def test_a_worker_killed_during_a_checkpoint_write_resumes_from_the_previous_one(
    ray_session, tmp_path, reference
):
    pl.seed_everything(0)
    model = DiesWhileSaving(str(tmp_path / "marker"))
    trainer = _trainer(
        tmp_path / "run",
        max_failures=1,
        logger=pl.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    with pytest.warns(UserWarning, match=r"restarting the workers from .*epoch=0-step=4\.ckpt"):
        trainer.fit(model, loader())
    assert trainer.global_step == 16
    for name, value in reference.items():
        assert torch.equal(model.state_dict()[name], value), name
    # The logger's history has one row per step: the rows of the replayed epoch replaced.
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    steps = [int(row.split(",")[-1]) for row in rows[1:]]
    assert len(steps) == len(set(steps)) and max(steps) == 15


def test_recovery_checkpoints_are_taken_when_none_are_configured(ray_session, tmp_path):
    trainer = _trainer(tmp_path, max_failures=1, enable_checkpointing=False)
    assert trainer.checkpoint_callbacks == []  # the recovery checkpoints are not the user's
    model = DiesOnce(str(tmp_path / "marker"), step=9)
    with pytest.warns(UserWarning, match=r"restarting the workers from .*recovery-epoch=1"):
        trainer.fit(model, loader())
    assert trainer.global_step == 16
    assert sorted(os.listdir(tmp_path / "recovery")) == ["recovery-epoch=3-step=16.ckpt"]


def test_logged_rows_of_replayed_steps_are_replaced_not_duplicated(ray_session, tmp_path):
    every_2_epochs = pl.callbacks.ModelCheckpoint(every_n_epochs=2, save_top_k=-1)
    trainer = _trainer(
        tmp_path,
        max_failures=1,
        callbacks=[every_2_epochs],
        logger=pl.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    # Epoch 2's rows (steps 8-11) reach the logger; the death in epoch 3 sends the run back
    # to the epoch-1 checkpoint (step 8), so steps 8-11 are logged a second time.
    with pytest.warns(UserWarning, match=r"epoch=1-step=8\.ckpt \(global step 8\)"):
        trainer.fit(DiesOnce(str(tmp_path / "marker"), step=13), loader())
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    steps = [int(row.split(",")[-1]) for row in rows[1:]]
    assert sorted(steps) == list(range(16))


class HangsOnce(Classifier):
    """Rank 1 stops answering at step 6 (the first time): its peer's collective times out."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.trainer.global_step == 6:
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                time.sleep(3600)
        return super().training_step(batch, batch_idx)


def test_a_hung_collective_times_out_and_the_run_recovers(ray_session, tmp_path):
    trainer = _trainer(tmp_path, max_failures=1, process_group_timeout_s=8)
    started = time.monotonic()
    with pytest.warns(UserWarning, match="collective broke during epoch 1"):
        trainer.fit(HangsOnce(str(tmp_path / "marker")), loader())
    assert trainer.global_step == 16
    assert time.monotonic() - started < 120  # not gloo's default 30 minutes
