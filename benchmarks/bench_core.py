"""The same 2-worker CPU job in plain torch DDP and in raylight, side by side.

    python benchmarks/bench_core.py --repeats 3

The job: a 784-128-10 MLP on 60k synthetic MNIST-shaped samples, batch 64 per worker,
SGD, 2 epochs, 2 CPU workers with 1 torch thread each, gloo.

- DDP: ``torch.multiprocessing.spawn`` of 2 processes, ``DistributedSampler(seed=0)``.
- raylight: ``pl.Trainer(num_workers=2, ...)``, which starts its own local Ray.

Two numbers per side. The steady epoch is the second epoch's time on rank 0, from the start
of its first batch to the end of its last. The fit wall time runs from just before spawning
(DDP) or building the Trainer (raylight) to the moment fit returns, so it includes process
and Ray start-up, but not the driver's imports. The two sides alternate order on each repeat,
and the table shows medians. ``--only ddp`` runs one side (to check it alone).
"""

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

WORLD_SIZE = 2
EPOCHS = 2
BATCH_SIZE = 64
NUM_SAMPLES = 60_000
LR = 0.05

GOAL_EPOCH_RATIO = 1.05
GOAL_EXTRA_WALL_S = 5.0


def _make_dataset() -> TensorDataset:
    """60k (784,) float32 features; labels from a fixed random linear teacher, so it's learnable."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(NUM_SAMPLES, 784, generator=generator)
    teacher = torch.randn(784, 10, generator=generator)
    return TensorDataset(features, (features @ teacher).argmax(dim=1))


def _make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, port: int, epochs_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    dataset = _make_dataset()
    sampler = DistributedSampler(dataset, seed=0)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)
    model = DistributedDataParallel(_make_mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    epoch_seconds = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        for features, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(features), labels).backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - start)
    if rank == 0:
        Path(epochs_file).write_text(json.dumps(epoch_seconds))
    dist.destroy_process_group()


def run_ddp(out_dir: Path) -> tuple[float, list[float]]:
    """Return (fit wall seconds, per-epoch seconds on rank 0)."""
    epochs_file = out_dir / "ddp_epochs.json"
    start = time.perf_counter()
    mp.spawn(_ddp_worker, args=(_free_port(), str(epochs_file)), nprocs=WORLD_SIZE, join=True)
    wall = time.perf_counter() - start
    return wall, json.loads(epochs_file.read_text())


def _raylight_job(out_dir: Path) -> tuple:
    """The same job as a LightningModule, a LightningDataModule and an epoch-timing Callback."""
    # Imported here, not at the top: the spawned DDP processes re-import this file and must
    # not pay for raylight and Ray. The classes are local for the same reason; Ray ships
    # them to its workers by value.
    import raylight as pl

    class BenchModel(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _make_mlp()

        def setup(self, stage: str) -> None:
            torch.set_num_threads(1)  # as on the DDP side, whatever the engine's default

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
            features, labels = batch
            return F.cross_entropy(self.net(features), labels)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    class BenchData(pl.LightningDataModule):
        def setup(self, stage: str) -> None:
            self.dataset = _make_dataset()

        def train_dataloader(self) -> DataLoader:
            # The Trainer swaps in a DistributedSampler(shuffle=True, seed=0), as on the DDP side.
            return DataLoader(self.dataset, batch_size=BATCH_SIZE, shuffle=True)

    class EpochTimer(pl.Callback):
        # Hooks run in the Ray workers: each rank hands its times back through a file.
        def __init__(self) -> None:
            self.epoch_seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.epoch_seconds.append(time.perf_counter() - self.start)
            epochs_file = out_dir / f"raylight_epochs_rank{trainer.global_rank}.json"
            epochs_file.write_text(json.dumps(self.epoch_seconds))

    return BenchModel(), BenchData(), EpochTimer()


def run_raylight(out_dir: Path) -> tuple[float, list[float]]:
    """Return (fit wall seconds, per-epoch seconds on rank 0)."""
    import ray

    import raylight as pl

    if ray.is_initialized():
        raise RuntimeError("Ray is already running: the timed run must include Ray's start-up.")
    model, datamodule, epoch_timer = _raylight_job(out_dir)
    start = time.perf_counter()
    trainer = pl.Trainer(
        num_workers=WORLD_SIZE,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[epoch_timer],
    )
    trainer.fit(model, datamodule=datamodule)
    wall = time.perf_counter() - start
    # Outside the timed region: the next repeat must start Ray again, from cold.
    ray.shutdown()
    return wall, json.loads((out_dir / "raylight_epochs_rank0.json").read_text())


def _print_table(results: dict[str, list[tuple[float, list[float]]]]) -> None:
    steady = {
        side: statistics.median(epochs[-1] for _, epochs in runs) for side, runs in results.items()
    }
    wall = {side: statistics.median(wall for wall, _ in runs) for side, runs in results.items()}
    repeats = len(next(iter(results.values())))
    print(f"\n{f'median of {repeats} repeat(s)':<24}" + "".join(f"{side:>10}" for side in results))
    print(f"{'steady epoch (s)':<24}" + "".join(f"{steady[side]:>10.3f}" for side in results))
    print(f"{'fit wall (s)':<24}" + "".join(f"{wall[side]:>10.2f}" for side in results))
    if len(results) < 2:
        return
    # Each repeat runs both sides back to back, so the ratio within a repeat cancels most of
    # the shared machine's drift; the median of those ratios is the figure to quote.
    pairs = zip(results["raylight"], results["ddp"], strict=True)
    ratio = statistics.median(r[1][-1] / d[1][-1] for r, d in pairs)
    extra = statistics.median(
        r[0] - d[0] for r, d in zip(results["raylight"], results["ddp"], strict=True)
    )
    print(
        f"\nsteady epoch raylight/DDP (median of per-repeat ratios): {ratio:.3f}x   "
        f"(goal <= {GOAL_EPOCH_RATIO}x: {'met' if ratio <= GOAL_EPOCH_RATIO else 'MISSED'})"
    )
    print(
        f"fit wall raylight - DDP (median of per-repeat differences): {extra:+.2f} s  "
        f"(goal <= +{GOAL_EXTRA_WALL_S:.0f} s: {'met' if extra <= GOAL_EXTRA_WALL_S else 'MISSED'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=["ddp", "raylight"], default=None)
    args = parser.parse_args()

    runners = {"ddp": run_ddp, "raylight": run_raylight}
    sides = [args.only] if args.only else list(runners)
    results: dict[str, list[tuple[float, list[float]]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="bench_core_") as tmp:
        for repeat in range(args.repeats):
            order = sides if repeat % 2 == 0 else sides[::-1]
            for side in order:
                wall, epoch_seconds = runners[side](Path(tmp))
                results[side].append((wall, epoch_seconds))
                epochs = ", ".join(f"{seconds:.3f}" for seconds in epoch_seconds)
                print(f"repeat {repeat} {side:>8}: fit wall {wall:.2f} s, epochs [{epochs}] s")
    _print_table(results)


if __name__ == "__main__":
    main()
