"""EarlyStopping: Lightning's decisions and messages, and the same stop on every rank."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from models import Classifier, loader
from pytorch_lightning.callbacks import EarlyStopping as LightningEarlyStopping

import raylight as pl
from raylight.callbacks import EarlyStopping
from raylight.callbacks.early_stopping import EarlyStoppingReason
from raylight.shared.config import MisconfigurationException

NAN = math.nan


class Scores(Classifier):
    """Logs each ``scores[name][rank][epoch]`` in validation, without syncing across ranks."""

    def __init__(self, scores: dict[str, list[list[float]]]) -> None:
        super().__init__()
        self.scores = scores

    def validation_step(self, batch, batch_idx):
        for name, per_rank in self.scores.items():
            self.log(name, per_rank[self.global_rank][self.current_epoch])


def _fit(
    callbacks: list[EarlyStopping], scores: dict[str, list[list[float]]], max_epochs: int = 6
) -> pl.Trainer:
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        process_group_timeout_s=30,  # ranks that disagree on stopping fail, not hang
    )
    trainer.fit(Scores(scores), loader(), loader())
    return trainer


# ---- the decision, step by step, against Lightning's own callback ------------------------------
class _FakeTrainer(SimpleNamespace):
    """What the check reads, for one rank of a one-rank run."""

    def __init__(self) -> None:
        strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
        super().__init__(
            callback_metrics={},
            current_epoch=0,
            should_stop=False,
            fast_dev_run=0,
            config=SimpleNamespace(fast_dev_run=0),
            strategy=strategy,
            global_rank=0,
            world_size=1,
        )


def _run_checks(callback, scores: list[float]) -> list[tuple]:
    """Check once per epoch until the callback stops; what it decided and held after each."""
    trainer, seen = _FakeTrainer(), []
    for epoch, score in enumerate(scores):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"score": torch.tensor(score)}
        callback._run_early_stopping_check(trainer)
        best = callback.best_score.item()
        seen.append(
            (
                trainer.should_stop,
                callback.wait_count,
                callback.stopped_epoch,
                callback.stopping_reason.value,
                callback.stopping_reason_message,
                "nan" if math.isnan(best) else best,
            )
        )
        if trainer.should_stop:
            break
    return seen


CASES = {
    "patience": ({"patience": 2}, [3.0, 2.0, 2.5, 2.6, 1.0], 3),
    "min_delta": ({"patience": 1, "min_delta": 0.5}, [3.0, 2.0, 1.8, 1.0], 2),
    "mode_max": ({"patience": 2, "mode": "max"}, [0.1, 0.5, 0.4, 0.3, 0.9], 3),
    "stopping_threshold": ({"mode": "max", "stopping_threshold": 0.9}, [0.1, 0.5, 0.95, 1.0], 2),
    "divergence_threshold": ({"divergence_threshold": 5.0}, [3.0, 2.0, 6.0, 1.0], 2),
    "not_finite": ({}, [3.0, 2.0, NAN, 1.0], 2),
    "never": ({"patience": 3}, [3.0, 2.0, 1.0, 0.5], None),
}


@pytest.mark.parametrize("case", CASES)
def test_decisions_match_lightning(case):
    kwargs, scores, stop_epoch = CASES[case]
    ours = _run_checks(EarlyStopping("score", **kwargs), scores)
    theirs = _run_checks(LightningEarlyStopping("score", **kwargs), scores)
    assert ours == theirs
    stopped = [epoch for epoch, (should_stop, *_) in enumerate(ours) if should_stop]
    assert stopped == ([] if stop_epoch is None else [stop_epoch])


def test_checks_after_validation_when_it_is_not_once_per_epoch():
    def check_rule(**config):
        callback = EarlyStopping("score")
        trainer = SimpleNamespace(
            config=SimpleNamespace(
                **{"val_check_interval": 1.0, "check_val_every_n_epoch": 1, **config}
            )
        )
        callback.setup(trainer, None, "fit")
        return callback._check_on_train_epoch_end

    assert check_rule() is True
    assert check_rule(val_check_interval=0.5) is False
    assert check_rule(check_val_every_n_epoch=2) is False
    explicit = EarlyStopping("score", check_on_train_epoch_end=False)
    explicit.setup(SimpleNamespace(config=SimpleNamespace(val_check_interval=1.0)), None, "fit")
    assert explicit._check_on_train_epoch_end is False


def test_missing_monitor():
    trainer = _FakeTrainer()
    trainer.callback_metrics = {"val_loss": torch.tensor(1.0)}
    with pytest.raises(MisconfigurationException) as raised:
        EarlyStopping("val_acc")._run_early_stopping_check(trainer)
    assert isinstance(raised.value, RuntimeError)  # Lightning raises a RuntimeError
    assert str(raised.value) == (
        "Early stopping conditioned on metric `val_acc` which is not available. Pass in or "
        "modify your `EarlyStopping` callback to use any of the following: `val_loss`"
    )
    lenient = EarlyStopping("val_acc", strict=False)
    lenient._run_early_stopping_check(trainer)
    assert not trainer.should_stop and lenient.wait_count == 0


def test_arguments_state_and_key_follow_lightning():
    with pytest.raises(MisconfigurationException, match="`mode` can be min, max, got avg"):
        EarlyStopping("score", mode="avg")
    assert EarlyStopping("score", mode="max").state_key == (
        LightningEarlyStopping("score", mode="max").state_key
    )
    callback = EarlyStopping("score", patience=1)
    _run_checks(callback, [2.0, 3.0])
    state = callback.state_dict()
    assert state["wait_count"] == 1 and state["stopped_epoch"] == 1
    assert state["stopping_reason"] == EarlyStoppingReason.PATIENCE_EXHAUSTED.value
    restored = EarlyStopping("score", patience=5)
    restored.load_state_dict(state)
    assert restored.patience == 1 and restored.best_score.item() == 2.0
    assert restored.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED


# ---- real two-rank runs -----------------------------------------------------------------------
@pytest.mark.slow
def test_stops_when_patience_runs_out(ray_session):
    callback = EarlyStopping("score", patience=2)
    scores = [3.0, 2.0, 2.5, 2.6, 1.0, 0.5]
    trainer = _fit([callback], {"score": [scores, scores]})
    # Best at epoch 1, no improvement at epochs 2 and 3: the check at the end of epoch 3 stops.
    assert trainer.current_epoch == 4
    assert trainer.global_step == 4 * 4
    # The driver's callback carries rank 0's state.
    assert callback.stopped_epoch == 3
    assert callback.wait_count == 2
    assert callback.best_score.item() == 2.0
    assert callback.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert "did not improve in the last 2 records" in callback.stopping_reason_message


@pytest.mark.slow
def test_stops_on_a_threshold_or_a_non_finite_value(ray_session):
    # Three callbacks, each on its own metric, each with reason to stop at epoch 1.
    threshold = EarlyStopping("accuracy", mode="max", stopping_threshold=0.9, patience=10)
    divergence = EarlyStopping("loss", divergence_threshold=5.0, patience=10)
    finite = EarlyStopping("error", patience=10)
    scores = {
        "accuracy": [0.1, 0.95, 0.2, 0.2],
        "loss": [3.0, 6.0, 1.0, 1.0],
        "error": [3.0, NAN, 1.0, 1.0],
    }
    trainer = _fit(
        [threshold, divergence, finite],
        {name: [values, values] for name, values in scores.items()},
        max_epochs=4,
    )
    assert trainer.current_epoch == 2
    assert threshold.stopped_epoch == divergence.stopped_epoch == finite.stopped_epoch == 1
    assert threshold.stopping_reason is EarlyStoppingReason.STOPPING_THRESHOLD
    assert divergence.stopping_reason is EarlyStoppingReason.DIVERGENCE_THRESHOLD
    assert finite.stopping_reason is EarlyStoppingReason.NON_FINITE_METRIC
    assert threshold.stopping_reason_message == (
        "Stopping threshold reached: accuracy = 0.949999988079071 > 0.9. Signaling Trainer to stop."
    )


@pytest.mark.slow
def test_one_rank_wanting_to_stop_stops_every_rank(ray_session):
    # Rank 0 keeps improving; rank 1 does not improve at epoch 1 and, with patience 1, stops.
    callback = EarlyStopping("score", patience=1)
    trainer = _fit(
        [callback], {"score": [[4.0, 3.0, 2.0, 1.0, 0.5, 0.1], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]}
    )
    assert trainer.current_epoch == 2
    assert trainer.global_step == 2 * 4
    assert callback.stopped_epoch == 1  # rank 0 stopped too, though its own score improved
    assert callback.wait_count == 0
    assert callback.best_score.item() == 3.0


@pytest.mark.slow
def test_unlogged_monitor_fails_the_fit_with_lightnings_message(ray_session):
    with pytest.raises(
        MisconfigurationException,
        match=r"Early stopping conditioned on metric `val_acc` which is not available.*`score`",
    ):
        _fit([EarlyStopping("val_acc")], {"score": [[1.0] * 6, [1.0] * 6]})
