"""How long a run stands still when a worker dies: from the death to the first resumed step.

    python benchmarks/bench_recovery.py --repeats 3

A 2-worker CPU fit with ``max_failures=1`` loses rank 1 (``os._exit``) in the middle of its
second epoch. Each rank writes wall-clock stamps to a file: the dying rank just before it
exits, rank 0 at every training step. Recovery time is the gap between the death and the
first step after it, which covers the driver noticing the death, tearing down the group,
starting new workers, the rendezvous, shipping the module, restoring the latest committed
checkpoint and the first batch. It is compared with a cold start of the same fit (from
``fit()`` to its first step), which pays for most of the same work.

Prints medians and the recovery / cold-start ratio; the goal is at most 10 s of recovery.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import ray
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import raylight as pl

GOAL_S = 10.0


class Dies(pl.LightningModule):
    def __init__(self, stamps: str, die_at: int) -> None:
        super().__init__()
        self.stamps, self.die_at = stamps, die_at
        self.layer = torch.nn.Linear(32, 4)

    def training_step(self, batch, batch_idx):
        died = os.path.join(os.path.dirname(self.stamps), "died")
        if self.global_rank == 1 and self.trainer.global_step == self.die_at:
            if not os.path.exists(died):
                with open(died, "w") as f:
                    f.write(repr(time.time()))
                os._exit(1)
        if self.global_rank == 0:
            with open(self.stamps, "a") as f:
                f.write(f"{time.time()!r} {os.getpid()}\n")
        return F.cross_entropy(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(512, 32, generator=generator), torch.randint(0, 4, (512,)))
    return DataLoader(data, batch_size=32)  # 8 steps per epoch on each of 2 ranks


def one_run(workdir: str) -> tuple[float, float]:
    stamps = os.path.join(workdir, "stamps")
    model = Dies(stamps, die_at=12)
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=3,
        max_failures=1,
        default_root_dir=workdir,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    started = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, _loader())
    trainer.shutdown()
    with open(os.path.join(workdir, "died")) as f:
        died = float(f.read())
    steps = [(float(t), pid) for t, pid in (line.split() for line in open(stamps))]
    cold_start = steps[0][0] - started
    first_pid = steps[0][1]  # the new group's rank 0 is another process
    recovery = min(t for t, pid in steps if pid != first_pid) - died
    return recovery, cold_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    recoveries, cold_starts = [], []
    try:
        one_run(tempfile.mkdtemp())  # warm-up: Ray's first workers start slower
        for _ in range(args.repeats):
            recovery, cold_start = one_run(tempfile.mkdtemp())
            recoveries.append(recovery)
            cold_starts.append(cold_start)
            print(f"recovery {recovery:.2f} s, cold start {cold_start:.2f} s", file=sys.stderr)
    finally:
        ray.shutdown()
    recovery, cold_start = statistics.median(recoveries), statistics.median(cold_starts)
    print(f"recovery (death -> first resumed step): {recovery:.2f} s (goal <= {GOAL_S:.0f} s)")
    print(f"cold start (fit() -> first step):       {cold_start:.2f} s")
    print(f"recovery / cold start:                   {recovery / cold_start:.2f}x")
    print("goal met" if recovery <= GOAL_S else "goal MISSED")


if __name__ == "__main__":
    main()
