"""Sharded training (FSDP) in raylight, side by side with DDP, a hand-written FSDP2 loop and
Lightning, in one run.

    python benchmarks/bench_fsdp.py

The job: a decoder-only transformer (8 blocks of causal self-attention + MLP, width chosen
for ``--params-m`` million parameters, 50 by default: 57M) on random byte-level tokens,
batch 4 x 64 tokens per rank, AdamW, gradient clipping at 1.0; CPU workers with 1 torch
thread each and gloo (``--use-gpu``: one GPU per rank and NCCL). Three parts:

- Memory per rank: the bytes of the parameters, gradients and AdamW state a rank holds,
  summed over its *local* tensors (a DTensor's ``to_local()``), measured on rank 0 after
  the first optimizer step by a Callback, for raylight DDP and raylight FSDP at each of
  ``--world-sizes``. Goal: FSDP / DDP <= 1/N + 10%.
- Steady step time at 2 ranks: the median time between consecutive batch ends after the
  first ``--warmup`` steps, for a hand-written FSDP2 loop (``torch.multiprocessing`` +
  gloo + ``fully_shard`` on every block and the root, same model, batch and seed),
  raylight's ``FSDPStrategy(auto_wrap_policy={Block})``, and Lightning's own
  ``FSDPStrategy`` and ``ModelParallelStrategy`` (FSDP2 applied in ``configure_model``)
  where they run; a side that Lightning refuses says why. The sides run ``--repeats``
  times, in alternating order; each ratio is the median of the per-repeat ratios.
- Sharded checkpoint at 2 ranks, after each timed run: in the hand-written loop, the stall
  of one ``torch.distributed.checkpoint.async_save`` against cloning the local shards to
  host memory, and the throughput of a blocking ``save`` and ``load`` (all ranks' bytes
  over the wall time; the load reads back what the save just wrote, so mostly from the
  page cache); in raylight, the stall of ``trainer.save_checkpoint`` (sharded,
  asynchronous) called from a Callback, against the same clone.

Every side shares one local Ray, started first. At the defaults the run takes about 6
minutes on 2 cores. ``--params-m 5 --steps 4 --repeats 1`` checks it in about a minute.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

VOCAB_SIZE = 256  # byte-level tokens
N_LAYER = 8
HEAD_SIZE = 64
LR = 3e-4
CLIP = 1.0
STEP_RANKS = 2  # the step-time and checkpoint parts; the machine this was written on has 2 cores
GOAL_MEMORY_SLACK = 1.10  # FSDP / DDP <= 1/N + 10% of it
GOAL_STALL_RATIO = 1.5  # as bench_checkpoint.py: the stall at most 1.5x the copy


# ---- the model: plain torch, shared by every side ---------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.n_head = n_embd // HEAD_SIZE
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        batch, time_, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(batch, time_, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time_, channels))


class Block(nn.Module):
    """The FSDP unit on every side."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerLM(nn.Module):
    def __init__(self, n_embd: int, block_size: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB_SIZE, n_embd)
        self.position_embedding = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd) for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, VOCAB_SIZE, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)


def width_for(params_m: float) -> int:
    """The smallest multiple of the head size whose 8 blocks (12 C^2 parameters each) reach
    ``params_m`` million parameters."""
    width = math.sqrt(params_m * 1e6 / (12 * N_LAYER))
    return max(HEAD_SIZE, HEAD_SIZE * math.ceil(width / HEAD_SIZE))


def make_model(job: dict[str, Any]) -> TransformerLM:
    torch.manual_seed(0)  # every side starts from the same weights
    return TransformerLM(job["n_embd"], job["block_size"])


def make_dataset(job: dict[str, Any], world_size: int) -> TensorDataset:
    """Exactly ``steps`` batches per rank of random tokens (the targets: the next token)."""
    generator = torch.Generator().manual_seed(0)
    count = job["steps"] * job["batch_size"] * world_size
    tokens = torch.randint(VOCAB_SIZE, (count, job["block_size"] + 1), generator=generator)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def lm_loss(model: nn.Module, batch: list[Tensor]) -> Tensor:
    ids, targets = batch
    return F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())


def _local_bytes(tensor: Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's shard
    return local.numel() * local.element_size()


def training_state_bytes(module: nn.Module, optimizers: list[Any]) -> dict[str, int]:
    """What this rank holds of the parameters, their gradients and the optimizer state."""
    parameters = list(module.parameters())
    optimizer_bytes = sum(
        _local_bytes(value)
        for optimizer in optimizers
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value) and value.dim() > 0  # Adam's step counters are scalars
    )
    return {
        "parameters": sum(_local_bytes(p) for p in parameters),
        "gradients": sum(_local_bytes(p.grad) for p in parameters if p.grad is not None),
        "optimizer": optimizer_bytes,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _steady(batch_ends: list[float], warmup: int) -> float:
    """The median step time after the first ``warmup`` steps (lazy init, allocator warm-up)."""
    intervals = [end - start for start, end in itertools.pairwise(batch_ends)]
    return statistics.median(intervals[max(0, warmup - 1) :])


def _start_rank(rank: int, world_size: int, port: int, use_gpu: bool) -> torch.device:
    torch.set_num_threads(1)
    if use_gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if use_gpu else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    return torch.device("cuda", rank) if use_gpu else torch.device("cpu")


# ---- the hand-written FSDP2 loop ----------------------------------------------------------------
def _hand_worker(rank: int, job: dict[str, Any], port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = _start_rank(rank, STEP_RANKS, port, job["use_gpu"])
    mesh = init_device_mesh(device.type, (STEP_RANKS,))
    model = make_model(job).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    dataset = make_dataset(job, STEP_RANKS)
    sampler = DistributedSampler(dataset, num_replicas=STEP_RANKS, rank=rank, seed=0)
    batch_ends, memory = [], None
    for ids, targets in DataLoader(dataset, batch_size=job["batch_size"], sampler=sampler):
        # Lightning's order: forward, zero_grad, backward, clip, step.
        loss = lm_loss(model, [ids.to(device), targets.to(device)])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        memory = memory or training_state_bytes(model, [optimizer])
        batch_ends.append(time.perf_counter())
    checkpoint = _hand_checkpoint(model, optimizer, Path(out_dir))
    if rank == 0:
        result = {"batch_ends": batch_ends, "memory": memory, "checkpoint": checkpoint}
        (Path(out_dir) / "hand.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _clone_local(state: Any) -> Any:
    """The least a checkpoint must do before training may change the tensors: copy this
    rank's shards to host memory."""
    if isinstance(state, dict):
        return {key: _clone_local(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_clone_local(value) for value in state]
    if torch.is_tensor(state):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.detach().to("cpu", copy=True)
    return state


def _tensor_bytes(state: Any) -> int:
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, list):
        return sum(_tensor_bytes(value) for value in state)
    return _local_bytes(state) if torch.is_tensor(state) else 0


def _timed(function: Any) -> float:
    """Wall seconds of ``function()`` on all ranks together (from one barrier to the next)."""
    dist.barrier()
    start = time.perf_counter()
    function()
    dist.barrier()
    return time.perf_counter() - start


def _hand_checkpoint(model: nn.Module, optimizer: Any, out_dir: Path) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }
    device = next(model.parameters()).device  # NCCL reduces tensors on the GPU only
    total_bytes = torch.tensor(_tensor_bytes(state), dtype=torch.float64, device=device)
    dist.all_reduce(total_bytes)
    dist.barrier()
    start = time.perf_counter()
    _clone_local(state)
    copy_s = time.perf_counter() - start
    # Asynchronous saves coordinate on their own group, as a training loop beside them would.
    checkpoint_group = dist.new_group(backend="gloo")
    dist.barrier()
    start = time.perf_counter()
    future = dcp.async_save(
        state, checkpoint_id=str(out_dir / "hand-async"), process_group=checkpoint_group
    )
    stall_s = time.perf_counter() - start
    future.result()
    written_s = time.perf_counter() - start
    save_s = _timed(lambda: dcp.save(state, checkpoint_id=str(out_dir / "hand-sync")))
    load_s = _timed(lambda: dcp.load(state, checkpoint_id=str(out_dir / "hand-sync")))
    megabytes = total_bytes.item() / 1e6
    return {
        "megabytes": megabytes,
        "copy_s": copy_s,
        "stall_s": stall_s,
        "written_s": written_s,
        "save_mb_s": megabytes / save_s,
        "load_mb_s": megabytes / load_s,
    }


def run_hand(job: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(dir=out_dir))  # each run saves into empty directories
    mp.spawn(_hand_worker, args=(job, _free_port(), str(run_dir)), nprocs=STEP_RANKS, join=True)
    result = json.loads((run_dir / "hand.json").read_text())
    shutil.rmtree(run_dir)  # its checkpoints are as large as the model's training state
    return result


# ---- Lightning's FSDPStrategy and ModelParallelStrategy ---------------------------------------
def _lightning_worker(rank: int, job: dict[str, Any], port: int, kind: str, out_file: str) -> None:
    import pytorch_lightning as lightning

    # Lightning's own environment: processes started outside it, torchrun's variables.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0",
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(STEP_RANKS),
    )  # fmt: skip
    torch.set_num_threads(1)
    lightning.seed_everything(0)

    class LightningLM(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model(job)

        def configure_model(self) -> None:
            if kind != "model_parallel":
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
            return lm_loss(self.model, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR)

    class BatchEnds(lightning.Callback):
        def __init__(self) -> None:
            self.batch_ends: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batch_ends.append(time.perf_counter())

    timer = BatchEnds()
    trainer = lightning.Trainer(
        **_lightning_scaling(job["use_gpu"], kind),
        max_epochs=1,
        gradient_clip_val=CLIP,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = DataLoader(make_dataset(job, STEP_RANKS), batch_size=job["batch_size"], shuffle=True)
    trainer.fit(LightningLM(), train_dataloaders=loader)
    if rank == 0:
        Path(out_file).write_text(json.dumps({"batch_ends": timer.batch_ends}))


def _lightning_scaling(use_gpu: bool, kind: str) -> dict[str, Any]:
    from pytorch_lightning.strategies import FSDPStrategy, ModelParallelStrategy

    if kind == "model_parallel":
        strategy = ModelParallelStrategy(data_parallel_size=STEP_RANKS, tensor_parallel_size=1)
    else:
        strategy = FSDPStrategy(auto_wrap_policy={Block})
    return {"accelerator": "gpu" if use_gpu else "cpu", "devices": STEP_RANKS, "strategy": strategy}


def lightning_refusal(job: dict[str, Any], kind: str) -> str | None:
    """Why Lightning refuses this job, or None. Lightning checks the strategy against the
    accelerator when the Trainer is built: a refusal shows here, before any rank starts."""
    try:
        import pytorch_lightning as lightning

        lightning.Trainer(**_lightning_scaling(job["use_gpu"], kind), logger=False)
    except Exception as error:  # whatever Lightning raises is the answer to print
        return f"{type(error).__name__}: {error}"
    return None


def run_lightning(job: dict[str, Any], out_dir: Path, kind: str) -> dict[str, Any]:
    out_file = out_dir / f"lightning_{kind}.json"
    try:
        mp.spawn(
            _lightning_worker,
            args=(job, _free_port(), kind, str(out_file)),
            nprocs=STEP_RANKS,
            join=True,
        )
    except Exception as error:  # a rank's failure: its traceback's last line says why
        return {"error": str(error).strip().splitlines()[-1]}
    return json.loads(out_file.read_text())


# ---- raylight ---------------------------------------------------------------------------------
def _raylight_job(job: dict[str, Any], world_size: int, batch_size: int) -> tuple[Any, Any]:
    """The job as a LightningModule and a LightningDataModule."""
    # Imported here, not at the top: the spawned processes of the other sides re-import this
    # file and must not pay for raylight and Ray. The classes are local for the same reason;
    # Ray ships them to its workers by value.
    import raylight as pl

    class RaylightLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model(job)

        def setup(self, stage: str) -> None:
            torch.set_num_threads(1)  # as on the other sides, whatever the engine's default

        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
            return lm_loss(self.model, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR)

    class Data(pl.LightningDataModule):
        def setup(self, stage: str) -> None:
            self.dataset = make_dataset({**job, "batch_size": batch_size}, world_size)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.dataset, batch_size=batch_size, shuffle=True)

    return RaylightLM(), Data()


def _raylight_measure(save: bool, out_dir: Path) -> Any:
    """A Callback that measures on the ranks and keeps rank 0's figures on itself: the
    driver's callback gets rank 0's state after fit."""
    import raylight as pl

    class Measure(pl.Callback):
        def __init__(self) -> None:
            self.batch_ends: list[float] = []
            self.memory: dict[str, int] | None = None
            self.checkpoint: dict[str, float] | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batch_ends.append(time.perf_counter())
            if self.memory is None:  # after the first optimizer step: AdamW's state exists
                self.memory = training_state_bytes(pl_module, trainer.optimizers)
            if save and batch_idx == trainer.num_training_batches - 1:
                self.checkpoint = _raylight_save(trainer, pl_module, out_dir)

    return Measure()


def _raylight_save(trainer: Any, pl_module: Any, out_dir: Path) -> dict[str, float]:
    """One sharded save from the loop (every rank calls it): the stall, against the clone."""
    start = time.perf_counter()
    _clone_local([list(pl_module.parameters()), [o.state for o in trainer.optimizers]])
    copy_s = time.perf_counter() - start
    start = time.perf_counter()
    trainer.save_checkpoint(str(out_dir / "raylight-step.ckpt"))
    stall_s = time.perf_counter() - start
    trainer.strategy.wait_for_save()
    return {"copy_s": copy_s, "stall_s": stall_s, "written_s": time.perf_counter() - start}


def run_raylight(
    job: dict[str, Any], out_dir: Path, world_size: int, sharded: bool, timed: bool
) -> dict[str, Any]:
    """A fit on ``world_size`` workers; only the timed run takes the full batch and saves."""
    import raylight as pl
    from raylight.strategies import FSDPStrategy

    batch_size = job["batch_size"] if timed else 1  # the memory runs need one step, no more
    run_dir = Path(tempfile.mkdtemp(dir=out_dir))
    model, datamodule = _raylight_job(job, world_size, batch_size)
    measure = _raylight_measure(timed and sharded, run_dir)
    trainer = pl.Trainer(
        strategy=FSDPStrategy(auto_wrap_policy={Block}) if sharded else "ddp",
        num_workers=world_size,
        use_gpu=job["use_gpu"],
        max_epochs=1,
        limit_train_batches=1.0 if timed else 1,
        gradient_clip_val=CLIP,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        callbacks=[measure],
    )
    trainer.fit(model, datamodule=datamodule)
    del trainer
    gc.collect()  # a dropped Trainer ends its workers: the next group gets the CPUs
    shutil.rmtree(run_dir)
    return {
        "batch_ends": measure.batch_ends,
        "memory": measure.memory,
        "checkpoint": measure.checkpoint,
    }


def run_memory(
    job: dict[str, Any], out_dir: Path, world_sizes: list[int], timed_fsdp: dict[str, int]
) -> dict[tuple[int, bool], dict[str, int]]:
    """One short fit per (world size, DDP or FSDP); the timed FSDP runs measured 2 ranks."""
    memory = {}
    for world_size in world_sizes:
        for sharded in (False, True):
            if sharded and world_size == STEP_RANKS:
                memory[(world_size, sharded)] = timed_fsdp
                continue
            result = run_raylight(job, out_dir, world_size, sharded, timed=False)
            memory[(world_size, sharded)] = result["memory"]
            side = "FSDP" if sharded else "DDP"
            print(f"raylight {side}, {world_size} ranks: {_megabytes(result['memory']):.1f} MB")
    return memory


def _megabytes(memory: dict[str, int]) -> float:
    return sum(memory.values()) / 1e6


def print_memory(memory: dict[tuple[int, bool], dict[str, int]], hand: dict[str, int]) -> None:
    print("\nmemory per rank: parameters + gradients + AdamW state, local tensors (MB)")
    print(f"{'ranks':>5} {'raylight DDP':>13} {'raylight FSDP':>14} {'FSDP/DDP':>9}  goal")
    for world_size in sorted({n for n, _ in memory}):
        ddp, fsdp = _megabytes(memory[(world_size, False)]), _megabytes(memory[(world_size, True)])
        ratio, goal = fsdp / ddp, GOAL_MEMORY_SLACK / world_size
        verdict = "met" if ratio <= goal else "MISSED"
        print(
            f"{world_size:>5} {ddp:>13.1f} {fsdp:>14.1f} {ratio:>8.3f}x"
            f"  <= 1/{world_size} + 10% = {goal:.3f}x: {verdict}"
        )
    print(f"(hand-written FSDP2 loop, {STEP_RANKS} ranks: {_megabytes(hand):.1f} MB)")


def print_step_times(
    results: dict[str, list[dict[str, Any]]], refusals: dict[str, str], warmup: int
) -> None:
    steady = {
        side: [_steady(run["batch_ends"], warmup) for run in runs]
        for side, runs in results.items()
        if all("error" not in run for run in runs)
    }
    hand = steady["hand-written FSDP2"]
    repeats = len(hand)
    print(
        f"\nsteady step time, {STEP_RANKS} ranks, s (median of {repeats} repeat(s), each the "
        f"median step after the first {warmup}); ratio: median of per-repeat ratios"
    )
    for side, runs in results.items():
        if side not in steady:
            errors = {run["error"] for run in runs if "error" in run}
            print(f"  {side:<32} could not run: {'; '.join(sorted(errors))}")
            continue
        ratio = statistics.median(s / h for s, h in zip(steady[side], hand, strict=True))
        print(
            f"  {side:<32} {statistics.median(steady[side]):8.3f}   "
            f"{ratio:6.3f}x the hand-written loop"
        )
    for side, reason in refusals.items():
        print(f"  {side:<32} could not run: {reason}")


def print_checkpoint(hand: list[dict[str, float]], raylight: list[dict[str, float]]) -> None:
    print(
        f"\nsharded checkpoint, {STEP_RANKS} ranks, {hand[0]['megabytes']:.0f} MB in all "
        f"(weights + AdamW state); rank 0's seconds, median of {len(hand)}"
    )
    for side, runs in (
        ("hand-written, dcp.async_save", hand),
        ("raylight, save_checkpoint", raylight),
    ):
        figures = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        ratio = figures["stall_s"] / figures["copy_s"]
        verdict = "met" if ratio <= GOAL_STALL_RATIO else "MISSED"
        print(
            f"  {side:<30} clone {figures['copy_s']:.3f}  stall {figures['stall_s']:.3f} "
            f"({ratio:.2f}x clone; goal <= {GOAL_STALL_RATIO}x: {verdict})  "
            f"shards written {figures['written_s']:.3f}"
        )
    save = statistics.median(run["save_mb_s"] for run in hand)
    load = statistics.median(run["load_mb_s"] for run in hand)
    print(
        f"  blocking dcp.save {save:.0f} MB/s, dcp.load {load:.0f} MB/s "
        "(all ranks' bytes over the wall time; the load reads what the save just wrote)"
    )


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=float, default=50.0, help="model size, millions")
    parser.add_argument("--steps", type=int, default=8, help="training steps per rank, timed runs")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the time")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank")
    parser.add_argument("--block-size", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="of the step-time sides")
    parser.add_argument("--world-sizes", default="2,4", help="ranks for the memory table")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per rank, NCCL")
    parser.add_argument("--skip-lightning", action="store_true")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        args.warmup = max(0, args.steps - 2)  # keep at least two steady steps to time
    return args


def _run_repeats(job: dict[str, Any], out_dir: Path, repeats: int, sides: list[str]) -> dict:
    """The step-time sides, in alternating order on each repeat: the ratio within a repeat
    cancels most of a shared machine's drift."""
    runners = {
        "hand-written FSDP2": lambda: run_hand(job, out_dir),
        "Lightning ModelParallelStrategy": lambda: run_lightning(job, out_dir, "model_parallel"),
        "Lightning FSDPStrategy": lambda: run_lightning(job, out_dir, "fsdp"),
        "raylight FSDPStrategy": lambda: run_raylight(job, out_dir, STEP_RANKS, True, True),
    }
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for repeat in range(repeats):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            results[side].append(runners[side]())
            print(f"repeat {repeat} {side}: {_describe(results[side][-1], job['warmup'])}")
    return results


def _describe(result: dict[str, Any], warmup: int) -> str:
    if "error" in result:
        return f"could not run: {result['error']}"
    return f"steady step {_steady(result['batch_ends'], warmup):.3f} s"


def main() -> None:
    import ray

    args = _parse_args()
    job = {
        "n_embd": width_for(args.params_m),
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "use_gpu": args.use_gpu,
    }
    parameters = sum(p.numel() for p in make_model(job).parameters())
    print(
        f"model: {N_LAYER} blocks x width {job['n_embd']}, {parameters / 1e6:.1f}M parameters; "
        f"batch {args.batch_size} x {args.block_size} tokens per rank; {args.steps} steps",
        flush=True,
    )
    sides, refusals = ["hand-written FSDP2"], {}
    for kind, side in (
        ("fsdp", "Lightning FSDPStrategy"),
        ("model_parallel", "Lightning ModelParallelStrategy"),
    ):
        refusal = None if args.skip_lightning else lightning_refusal(job, kind)
        if refusal is not None:
            refusals[side] = refusal
        elif not args.skip_lightning:
            sides.append(side)
    sides.append("raylight FSDPStrategy")
    world_sizes = [int(n) for n in args.world_sizes.split(",")]
    # One local Ray for every side, up from the start, so that its idle daemons weigh on all
    # of them alike. Logical CPUs: every raylight worker asks for one, the 4-rank groups too.
    ray.init(
        address="local",
        num_cpus=max([*world_sizes, STEP_RANKS]) + 1,
        include_dashboard=False,
        logging_level="WARNING",
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench_fsdp_") as tmp:
            results = _run_repeats(job, Path(tmp), args.repeats, sides)
            timed_fsdp = results["raylight FSDPStrategy"][0]["memory"]
            memory = run_memory(job, Path(tmp), world_sizes, timed_fsdp)
    finally:
        ray.shutdown()
    print_memory(memory, results["hand-written FSDP2"][0]["memory"])
    print_step_times(results, refusals, args.warmup)
    print_checkpoint(
        [run["checkpoint"] for run in results["hand-written FSDP2"]],
        [run["checkpoint"] for run in results["raylight FSDPStrategy"]],
    )


if __name__ == "__main__":
    main()
