"""Ray Tune sweeps where every trial is a distributed Trainer, with no callback to add.

    from ray import tune
    from raylight.tune import resources

    tuner = tune.Tuner(tune.with_resources(train_fn, resources(num_workers=2)), ...)

``resources`` reserves one bundle for the trial's function (the Trainer's driver) and one
per worker. Inside a trial the Trainer places its workers in those bundles, so a sweep never
oversubscribes the cluster; reports the logged metrics (plus ``epoch`` and ``step``) to Tune
after every epoch, with the newest checkpoint the epoch committed, so schedulers such as ASHA
can stop bad trials early; and resumes from ``ray.tune.get_checkpoint()`` when Tune hands the
trial one (PopulationBasedTraining, or a trial restarted by ``FailureConfig``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from ray.tune import PlacementGroupFactory

CHECKPOINT_NAME = "checkpoint.ckpt"  # the file inside a checkpoint directory handed to Tune


def resources(
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: int = 1,
    resources_per_worker: dict[str, float] | None = None,
) -> PlacementGroupFactory:
    """What one trial needs: a CPU for its driver plus one bundle per worker."""
    worker = {"CPU": float(cpus_per_worker), **(resources_per_worker or {})}
    if use_gpu:
        worker.setdefault("GPU", 1.0)
    return PlacementGroupFactory([{"CPU": 1.0}] + [dict(worker) for _ in range(num_workers)])


def in_trial() -> bool:
    """True inside a Tune trial's function (not inside a Ray Train worker)."""
    try:  # the session object is Ray's internal, the check is the one ray.tune.report uses
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session
    except ImportError:
        return False
    return bool(_in_tune_session())


def trial_placement_group() -> Any:
    """The trial's placement group, whose bundles 1.. are for the workers."""
    import ray

    return ray.util.get_current_placement_group() if in_trial() else None


def report(metrics: dict[str, float], checkpoint_path: str | None) -> None:
    """``ray.tune.report`` with ``checkpoint_path`` (a .ckpt file) as a Tune checkpoint."""
    from ray import tune

    if checkpoint_path is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raylight-tune-") as folder:
        _link_or_copy(checkpoint_path, os.path.join(folder, CHECKPOINT_NAME))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def checkpoint_from_tune() -> str | None:
    """The .ckpt of the checkpoint Tune gives this trial to start from, copied locally."""
    from ray import tune

    given = tune.get_checkpoint()
    if given is None:
        return None
    target = os.path.join(tempfile.mkdtemp(prefix="raylight-tune-"), CHECKPOINT_NAME)
    with given.as_directory() as folder:
        shutil.copyfile(os.path.join(folder, CHECKPOINT_NAME), target)
    return target


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)  # no copy on the same filesystem; Tune copies it to storage
    except OSError:
        shutil.copyfile(source, target)
