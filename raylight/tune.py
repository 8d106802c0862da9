"""Ray Tune sweeps where every trial is a distributed Trainer, with no callback to add.

    from ray import tune
    from raylight.tune import resources

    tuner = tune.Tuner(tune.with_resources(train_fn, resources(num_workers=2)), ...)

``resources`` reserves one bundle for the trial's function (the Trainer's driver) and one
per worker. Inside a trial the Trainer:

- places its workers in those bundles, so a sweep never oversubscribes the cluster;
- reports to Tune once per validation run (several per epoch with ``val_check_interval``;
  once per epoch end when the fit has no validation): the logged metrics, plus ``epoch``
  and ``step``, with the newest checkpoint committed by then, so schedulers such as ASHA
  can stop bad trials early. The reports of an epoch reach Tune when the epoch ends;
- keeps its files in the trial's folder in Tune's storage (``RunConfig(storage_path=...)``)
  when ``default_root_dir`` is not given and that storage is a filesystem path; Tune's own
  checkpoints there follow its ``CheckpointConfig(num_to_keep=...)``;
- resumes from ``ray.tune.get_checkpoint()`` when Tune hands the trial one
  (PopulationBasedTraining, or a trial restarted by ``FailureConfig``).

A ``TuneConfig(metric=...)`` that the module never logs is Tune's own error at the trial's
first report; it names the metric and shows the reported ones.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from ray.tune import PlacementGroupFactory

from raylight.driver import connect
from raylight.shared import sharded, storage

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


def init_ray(num_workers: int, cpus_per_worker: int = 1, **ray_init_kwargs: Any) -> None:
    """Start the sweep's Ray as a Trainer would: the cluster ``RAY_ADDRESS`` names, else the
    one ``ray start`` recorded on this node, else a local instance with room for one trial
    (its driver and its workers). Never another script's embedded Ray. An entry point: it
    reads ``RAY_ADDRESS`` here."""
    needed = 1 + num_workers * cpus_per_worker
    connect.connect(os.environ.get("RAY_ADDRESS"), ray_init_kwargs, needed, warned=set())


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


def trial_root() -> str | None:
    """The trial's folder in Tune's storage, when that storage is a filesystem path (local
    or mounted on every node); None for object stores, whose URI Tune does not keep.

    ``get_trial_dir()`` would not do: it names a local staging folder outside the storage.
    """
    from ray import tune

    try:  # get_storage is Tune's developer API: its StorageContext has the trial's path
        context = tune.get_context().get_storage()
        filesystem, path = context.storage_filesystem, context.trial_fs_path
    except (AttributeError, RuntimeError):
        return None
    return path if filesystem.type_name == "local" else None


def report(metrics: dict[str, float], checkpoint_path: str | None, root: str) -> None:
    """``ray.tune.report`` with ``checkpoint_path`` (a .ckpt file, or a sharded checkpoint's
    directory) as a Tune checkpoint.

    The checkpoint reaches Tune through a folder under ``root`` that holds hard links to its
    files (no copy on the same filesystem); Tune copies them into its storage, and the folder
    goes.
    """
    from ray import tune

    if checkpoint_path is None:
        tune.report(metrics)
        return
    staging = None if storage.is_uri(root) else root
    if staging is not None:
        os.makedirs(staging, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".raylight-tune-", dir=staging) as folder:
        _place(checkpoint_path, os.path.join(folder, CHECKPOINT_NAME))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


@contextlib.contextmanager
def checkpoint_from_tune(root: str) -> Iterator[str | None]:
    """The .ckpt (or sharded directory) of the checkpoint Tune gives this trial to start from,
    or None.

    Held under ``root`` while the context lasts (Tune may delete its own copy meanwhile,
    under ``num_to_keep``; a failure before this fit's first checkpoint resumes from it).
    One name per trial: a trial stopped mid-fit (PBT pauses) leaves one at most.
    """
    from ray import tune

    given = tune.get_checkpoint()
    if given is None:
        yield None
        return
    target = storage.join(root, ".raylight-tune-restore.ckpt")
    with given.as_directory() as folder:
        source = os.path.join(folder, CHECKPOINT_NAME)
        storage.delete_tree(target)
        if storage.is_uri(root) and os.path.isdir(source):
            storage.copy_tree(source, target)
        elif storage.is_uri(root):
            storage.copy_file(source, target)
        else:
            os.makedirs(root, exist_ok=True)
            _place(source, target)
    try:
        yield target
    finally:
        storage.delete_tree(target)


def _place(source: str, target: str) -> None:
    """Put the checkpoint ``source`` (a path or a URI; a file, or a sharded checkpoint's
    directory) at the local path ``target``."""
    if sharded.is_sharded(source):
        os.makedirs(target)
        for name in storage.list_names(source):
            _place_file(storage.join(source, name), os.path.join(target, name))
        return
    _place_file(source, target)


def _place_file(source: str, target: str) -> None:
    if storage.is_uri(source):
        storage.copy_file(source, target)
        return
    try:
        os.link(source, target)  # no copy on the same filesystem
    except OSError:
        shutil.copyfile(source, target)
