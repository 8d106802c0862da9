"""What a checkpoint costs the training loop: the stall per save, against copying the state.

    python benchmarks/bench_checkpoint.py --repeats 5

The model is a 4096-wide MLP (about 50M parameters, 200 MB) with Adam's state (two more
copies), saved through raylight's own save path on one rank (no Ray needed):

- copy: cloning the model's and the optimizer's tensors to CPU memory, the least any
  checkpoint must do before training may change them;
- stall: how long ``save_from_rank`` keeps the loop waiting (build + serialize + hand-off; the
  write itself happens on a background thread);
- commit: from the save until the file is complete on disk;
- restore: reading the file back into the model and the optimizer.

Prints medians and the stall / copy ratio (goal: at most 1.5x).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import raylight as pl
from raylight.rank import checkpointing
from raylight.rank.rank_trainer import RankTrainer
from raylight.shared import checkpoint

GOAL_RATIO = 1.5


class Wide(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(3)])


def _rank_trainer() -> RankTrainer:
    config = pl.Trainer(logger=False, enable_checkpointing=False).config
    trainer = RankTrainer(config, 0, 0, 0, 1, torch.device("cpu"))
    module = Wide()
    trainer.lightning_module = module
    module.trainer = trainer
    optimizer = torch.optim.Adam(module.parameters())
    for parameter in module.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()  # Adam now holds exp_avg and exp_avg_sq for every parameter
    trainer.optimizers = [optimizer]
    return trainer


def _copy_seconds(trainer: RankTrainer) -> float:
    start = time.perf_counter()
    {k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()}
    for state in trainer.optimizers[0].state.values():
        {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = _rank_trainer()
    figures: dict[str, list[float]] = {"copy": [], "stall": [], "commit": [], "restore": []}
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as tmp:
        for repeat in range(args.repeats):
            path = str(Path(tmp) / f"step-{repeat}.ckpt")
            figures["copy"].append(_copy_seconds(trainer))
            start = time.perf_counter()
            checkpointing.save_from_rank(trainer, path)
            figures["stall"].append(time.perf_counter() - start)
            trainer._writer.wait()
            figures["commit"].append(time.perf_counter() - start)
            start = time.perf_counter()
            loaded = checkpoint.load(path)
            trainer.lightning_module.load_state_dict(loaded["state_dict"])
            trainer.optimizers[0].load_state_dict(loaded["optimizer_states"][0])
            figures["restore"].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in figures.items()}
    print(
        f"checkpoint of {sum(p.numel() for p in trainer.lightning_module.parameters()) / 1e6:.0f}M "
        f"parameters + Adam state, medians of {args.repeats}:"
    )
    for name, seconds in medians.items():
        print(f"  {name:<8} {seconds:7.3f} s")
    ratio = medians["stall"] / medians["copy"]
    print(
        f"stall / copy: {ratio:.2f}x   (goal <= {GOAL_RATIO}x: {'met' if ratio <= GOAL_RATIO else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
