"""Where a restored fit continues (``raylight/rank/checkpointing.py``), without Ray."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from raylight.rank.checkpointing import Repartition, Resume, _restore_position
from raylight.shared.checkpoint import lightning_loops


def _trainer(world_size=2, rank=1):
    return SimpleNamespace(
        world_size=world_size,
        global_rank=rank,
        global_step=0,
        current_epoch=0,
        _batches_that_stepped=0,
        _resume_point=(0, 0),
    )


def _checkpoint(batches_done, world_size=2, **position):
    return {
        "epoch": 3,
        "global_step": 40,
        "raylight": {
            "next_epoch": 3,
            "batches_done": batches_done,
            "batches_that_stepped": 41,
            "world_size": world_size,
            "rng_states": [{"rank": 0}, {"rank": 1}],
            **position,
        },
    }


def test_a_fresh_epoch_is_not_mid_epoch_and_skips_nothing():
    resume = Resume(epoch=5)
    assert not resume.mid_epoch and resume.batches_to_skip == 0


def test_mid_epoch_at_the_same_world_size_skips_the_finished_batches():
    trainer = _trainer()
    resume = _restore_position(trainer, _checkpoint(batches_done=7))
    assert resume == Resume(epoch=3, batches_done=7, rng_states={"rank": 1})
    assert resume.mid_epoch and resume.batches_to_skip == 7
    # What a module or callback may read is on the trainer; the hand-off is not.
    assert (trainer.global_step, trainer.current_epoch) == (40, 3)
    assert trainer._batches_that_stepped == 41
    assert trainer._resume_point == (3, 0)


def test_mid_epoch_at_another_world_size_repartitions_instead_of_skipping():
    trainer = _trainer(world_size=3, rank=2)
    sampler = {"shuffle": True, "seed": 0, "drop_last": False}
    resume = _restore_position(trainer, _checkpoint(batches_done=7, sampler=sampler))
    assert resume.repartition == Repartition(
        world_size=2, batches_done=7, order=None, sampler_args=sampler
    )
    assert resume.mid_epoch and resume.batches_to_skip == 0
    assert resume.rng_states is None  # generator states are exact only at the same size


def test_an_already_repartitioned_epoch_keeps_its_own_order():
    trainer = _trainer()
    order = torch.tensor([5, 1, 4])
    resume = _restore_position(trainer, _checkpoint(batches_done=2, epoch_order=order))
    assert resume.repartition.order == [5, 1, 4]
    assert resume.batches_to_skip == 0


def test_a_pytorch_lightning_checkpoint_resumes_from_its_loops_entry():
    trainer = _trainer()
    checkpoint = {
        "epoch": 1,
        "global_step": 12,
        "loops": lightning_loops(1, 4, 10, 15, 12),
    }
    resume = _restore_position(trainer, checkpoint)
    assert resume == Resume(epoch=1, batches_done=4)
    assert trainer._batches_that_stepped == 12  # no raylight entry: the step count
