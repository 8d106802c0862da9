"""Fault-tolerant, elastic training: the digits job survives lost workers and nodes.

    python examples/elastic.py --kill-at-step 60

The Trainer runs between ``--min-workers`` and ``--max-workers`` ranks (as many as the
cluster has room for), retries up to ``--max-failures`` system failures, and takes its own
recovery checkpoints every ``--recovery-every`` steps. ``--kill-at-step N`` makes one rank
exit hard at step N (once), to watch the run restart from its latest checkpoint and finish
with the same accuracy. On a cluster, kill a node instead: the run goes on with the workers
that are left (at least the minimum), and grows back when the node returns.

    ray submit cluster.yaml examples/elastic.py -- --min-workers 2 --max-workers 8

SIGTERM or Ctrl-C stops the run at a batch all ranks agree on, with a checkpoint there;
``--ckpt-path last`` resumes it.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the digits example's classes

from digits import DigitsDataModule, DigitsModel  # noqa: E402

import raylight as pl  # noqa: E402


class KillOnce(pl.Callback):
    """Rank 1 (or 0 alone) exits hard at ``step``, the first time the run gets there."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        victim = min(1, trainer.world_size - 1)
        if trainer.global_step == self.step and trainer.global_rank == victim:
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                print(f"rank {victim}: exiting hard at step {self.step}", flush=True)
                os._exit(1)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-workers", type=int, default=1)
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=None, help="fixed size (no elasticity)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--max-epochs", type=int, default=25)
    parser.add_argument("--max-failures", type=int, default=3, help="-1: retry without limit")
    parser.add_argument("--recovery-every", type=int, default=20, help="steps between checkpoints")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--default-root-dir", default=None, help="a path or storage URI")
    parser.add_argument("--ckpt-path", default=None, help='a checkpoint, or "last"')
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    args = _parse_args(argv)
    pl.seed_everything(args.seed)
    root = args.default_root_dir or os.getcwd()
    callbacks = []
    if args.kill_at_step is not None:
        callbacks.append(KillOnce(args.kill_at_step, os.path.join(root, "killed-once")))
    trainer = pl.Trainer(
        num_workers=args.num_workers or (args.min_workers, args.max_workers),
        use_gpu=args.use_gpu,
        max_epochs=args.max_epochs,
        max_failures=args.max_failures,
        recovery_every_n_train_steps=args.recovery_every,
        elastic_check_interval=30.0,
        default_root_dir=root,
        callbacks=callbacks,
    )
    model, datamodule = DigitsModel(), DigitsDataModule()
    trainer.fit(model, datamodule=datamodule, ckpt_path=args.ckpt_path)
    (results,) = trainer.test(model, datamodule=datamodule)
    accuracy = results["test_acc"]
    print(f"test accuracy: {accuracy:.3f} after {trainer.global_step} steps")
    return accuracy


if __name__ == "__main__":
    main()
