"""What a Tune sweep of distributed trials costs beyond their training: raylight vs Ray Train.

    python benchmarks/bench_tune.py --repeats 2

The sweep: 4 trials (a grid over the learning rate), each 2 CPU workers x 2 epochs of a
64-256-256-10 MLP on 32k synthetic digit-shaped samples (64 features, 10 classes), batch 32
per worker, SGD, gloo, 1 torch thread per worker. One Ray instance, started here with 4
logical CPUs, runs both sides; ``max_concurrent_trials=1`` runs the trials one at a time.

- raylight: ``tune.with_resources(trial, raylight.tune.resources(num_workers=2))``, each trial
  a ``pl.Trainer(num_workers=2, max_epochs=2).fit(...)``, which reports to Tune by itself.
- Ray Train: each trial builds a ``TorchTrainer`` with ``ScalingConfig(num_workers=2)`` and
  calls ``fit()``; the workers use ``prepare_model`` / ``prepare_data_loader`` and call
  ``ray.train.report`` every epoch, which ``TuneReportCallback`` passes on to Tune. This is
  how Ray Train V2, Ray's default Train implementation, runs under Tune: ``tune.Tuner``
  rejects a V2 ``TorchTrainer`` given as the trainable ("not string nor trainable"). The
  trial holds 1 CPU for the function and its workers 2 more, the same 3 CPUs that
  ``resources(num_workers=2)`` reserves.

Checkpoints: with ``--checkpoint epoch`` (the default) both sides save one per epoch on rank 0
(the model and the optimizer) and hand it to Tune with the epoch's report; with
``--checkpoint none`` neither does. Neither side validates, logs to files or shows progress.

Training time is measured the same way on both sides, inside the workers: on rank 0, from
the start of an epoch's first batch (once the loader has yielded it) to the end of its last
``optimizer.step()``, summed over the epochs and reported to Tune as ``train_seconds``. The
sweep's wall time runs from building the ``Tuner`` to ``fit()`` returning. Per-trial overhead
= (sweep wall time - the trials' summed training time) / trials: worker and process-group
start-up, data set-up, reporting, checkpoints, teardown, and Tune's own scheduling, which
both sides pay alike. A one-trial, one-epoch sweep of each side warms Ray up first; then the
sides alternate order on each repeat, and the ratio quoted is the median of the per-repeat
raylight / Ray Train ratios (goal: at most 0.5).
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raylight as pl
from raylight.tune import resources

NUM_TRIALS = 4
NUM_WORKERS = 2
EPOCHS = 2
BATCH_SIZE = 32
NUM_SAMPLES = 32_000
NUM_CPUS = 4  # one trial at a time: its driver and 2 workers, plus room for Ray's own actors
LEARNING_RATES = [0.01, 0.02, 0.05, 0.1]

GOAL_RATIO = 0.5


def _make_dataset() -> TensorDataset:
    """(NUM_SAMPLES, 64) float32 features; labels from a fixed random linear teacher."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(NUM_SAMPLES, 64, generator=generator)
    teacher = torch.randn(64, 10, generator=generator)
    return TensorDataset(features, (features @ teacher).argmax(dim=1))


def _make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


# ---- raylight ---------------------------------------------------------------------------------
class _BenchModel(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = _make_mlp()

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)  # as in the Ray Train workers, whatever the engine's default

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        features, labels = batch
        return F.cross_entropy(self.net(features), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _BenchData(pl.LightningDataModule):
    def setup(self, stage: str) -> None:
        self.dataset = _make_dataset()  # on every rank, as the Ray Train workers do

    def train_dataloader(self) -> DataLoader:
        # The Trainer swaps in a DistributedSampler, as prepare_data_loader does.
        return DataLoader(self.dataset, batch_size=BATCH_SIZE, shuffle=True)


class _TrainTimer(pl.Callback):
    """Each epoch's first batch start to its last batch end, summed, logged as train_seconds."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds += self.end - self.start
        # Not synced: the Trainer reports rank 0's callback_metrics to Tune.
        pl_module.log("train_seconds", self.seconds)


def _raylight_trial(config: dict) -> None:
    # No default_root_dir: the Trainer keeps its files in the trial's folder in Tune's storage.
    trainer = pl.Trainer(
        num_workers=NUM_WORKERS,
        max_epochs=config["epochs"],
        enable_checkpointing=config["checkpoint"],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[_TrainTimer()],
    )
    trainer.fit(_BenchModel(config["lr"]), datamodule=_BenchData())


def _raylight_tuner(param_space: dict, run_config: tune.RunConfig) -> tune.Tuner:
    return tune.Tuner(
        tune.with_resources(_raylight_trial, resources(num_workers=NUM_WORKERS)),
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=run_config,
    )


# ---- Ray Train --------------------------------------------------------------------------------
def _ray_train_worker(config: dict) -> None:
    torch.set_num_threads(1)
    loader = DataLoader(_make_dataset(), batch_size=BATCH_SIZE, shuffle=True)
    loader = ray.train.torch.prepare_data_loader(loader)
    model = ray.train.torch.prepare_model(_make_mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    rank_zero = ray.train.get_context().get_world_rank() == 0
    seconds = 0.0
    for epoch in range(config["epochs"]):
        loader.sampler.set_epoch(epoch)
        start = None
        for features, labels in loader:
            if start is None:  # the first batch is in hand, as at raylight's on_train_batch_start
                start = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(features), labels).backward()
            optimizer.step()
        seconds += time.perf_counter() - start
        metrics = {"train_seconds": seconds, "epoch": epoch}
        with tempfile.TemporaryDirectory(prefix="bench-tune-") as folder:
            checkpoint = None
            if config["checkpoint"] and rank_zero:
                state = {
                    "model": model.module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                }
                torch.save(state, os.path.join(folder, "checkpoint.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)


def _ray_train_trial(config: dict) -> None:
    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        _ray_train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=NUM_WORKERS),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=config["train_storage"],
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def _ray_train_tuner(param_space: dict, run_config: tune.RunConfig) -> tune.Tuner:
    return tune.Tuner(
        tune.with_resources(_ray_train_trial, {"CPU": 1}),  # the function's default, made plain
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=run_config,
    )


# ---- the sweep --------------------------------------------------------------------------------
TUNERS = {"raylight": _raylight_tuner, "ray-train": _ray_train_tuner}


def run_sweep(
    side: str, out_dir: Path, checkpoint: bool, trials: int = NUM_TRIALS, epochs: int = EPOCHS
) -> tuple[float, list[float]]:
    """Return (sweep wall seconds, each trial's training seconds)."""
    name = f"{side}-{time.time_ns()}"
    param_space = {
        "lr": tune.grid_search(LEARNING_RATES[:trials]),
        "epochs": epochs,
        "checkpoint": checkpoint,
        "train_storage": str(out_dir / f"{name}-train"),  # Ray Train's runs (raylight: unused)
    }
    run_config = tune.RunConfig(storage_path=str(out_dir), name=name, verbose=0)
    start = time.perf_counter()
    results = TUNERS[side](param_space, run_config).fit()
    wall = time.perf_counter() - start
    if results.errors:
        raise RuntimeError(f"the {side} sweep had failed trials: {results.errors}")
    for result in results:
        if result.metrics["training_iteration"] != epochs:
            raise RuntimeError(f"a {side} trial reported {result.metrics} after its last epoch")
        # Ray Train's TuneReportCallback hands Tune the path of the checkpoint Train stored.
        stored = result.checkpoint if side == "raylight" else result.metrics.get("checkpoint_path")
        if checkpoint and stored is None:
            raise RuntimeError(f"a {side} trial reported no checkpoint to Tune")
    return wall, [result.metrics["train_seconds"] for result in results]


def _overhead(wall: float, train_seconds: list[float]) -> float:
    return (wall - sum(train_seconds)) / len(train_seconds)


def _print_table(results: dict[str, list[tuple[float, list[float]]]], checkpoint: bool) -> None:
    repeats = len(next(iter(results.values())))
    rows = {
        "sweep wall (s)": {side: [wall for wall, _ in runs] for side, runs in results.items()},
        "training / trial (s)": {
            side: [sum(train) / len(train) for _, train in runs] for side, runs in results.items()
        },
        "overhead / trial (s)": {
            side: [_overhead(*run) for run in runs] for side, runs in results.items()
        },
    }
    policy = "one per epoch on both sides" if checkpoint else "none on either side"
    print(f"\n{NUM_TRIALS} trials x {NUM_WORKERS} workers x {EPOCHS} epochs; checkpoints: {policy}")
    print(f"{f'median of {repeats} repeat(s)':<24}" + "".join(f"{side:>11}" for side in results))
    for label, values in rows.items():
        medians = (statistics.median(values[side]) for side in results)
        print(f"{label:<24}" + "".join(f"{median:>11.2f}" for median in medians))
    if len(results) < 2:
        return
    # Each repeat runs both sides back to back, so the ratio within a repeat cancels most of
    # the shared machine's drift; the median of those ratios is the figure to quote.
    pairs = zip(results["raylight"], results["ray-train"], strict=True)
    ratios = [_overhead(*ours) / _overhead(*theirs) for ours, theirs in pairs]
    ratio = statistics.median(ratios)
    each = ", ".join(f"{r:.2f}" for r in ratios)
    print(
        f"\noverhead / trial, raylight / Ray Train (median of per-repeat ratios [{each}]): "
        f"{ratio:.2f}x   (goal <= {GOAL_RATIO}x: {'met' if ratio <= GOAL_RATIO else 'MISSED'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=list(TUNERS), default=None)
    parser.add_argument(
        "--checkpoint",
        choices=["epoch", "none"],
        default="epoch",
        help="both sides save one per epoch, or neither does",
    )
    args = parser.parse_args()
    checkpoint = args.checkpoint == "epoch"

    sides = [args.only] if args.only else list(TUNERS)
    results: dict[str, list[tuple[float, list[float]]]] = {side: [] for side in sides}
    ray.init(
        address="local",
        num_cpus=NUM_CPUS,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,  # both sides' workers chat; a failed trial still raises here
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench_tune_") as tmp:
            for side in sides:  # warm-up: Ray's first workers start slower
                run_sweep(side, Path(tmp), checkpoint, trials=1, epochs=1)
            for repeat in range(args.repeats):
                order = sides if repeat % 2 == 0 else sides[::-1]
                for side in order:
                    wall, train_seconds = run_sweep(side, Path(tmp), checkpoint)
                    results[side].append((wall, train_seconds))
                    trained = ", ".join(f"{seconds:.2f}" for seconds in train_seconds)
                    # On a shared machine the load says which repeats other work slowed down.
                    print(
                        f"repeat {repeat} {side:>9}: sweep {wall:.1f} s, training [{trained}] s, "
                        f"overhead {_overhead(wall, train_seconds):.2f} s/trial, "
                        f"load average {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
    finally:
        ray.shutdown()
    _print_table(results, checkpoint)


if __name__ == "__main__":
    main()
