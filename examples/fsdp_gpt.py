"""Train a small character-level GPT with sharded data parallelism (FSDP) on Ray.

    python examples/fsdp_gpt.py

The text is Python's own help pages (``pydoc_data.topics``, about 465k characters; it ships
with CPython, so the same Python version gives the same text everywhere and nothing is
downloaded). The model is a decoder-only transformer in the style of nanoGPT: token and
position embeddings, ``--n-layer`` blocks of causal self-attention and an MLP, a final
LayerNorm and a linear head over the characters. ``FSDPStrategy(auto_wrap_policy={Block})``
makes every block an FSDP unit: each of the ``--num-workers`` ranks holds a shard of every
parameter, gradient and AdamW state, and gathers one block's parameters at a time.

By default it runs 2 CPU workers on an embedded local Ray for one epoch (about a minute on
2 cores), prints the validation loss before and after training, writes a sharded checkpoint
(a directory) under ``--default-root-dir``, and samples a few hundred characters from the
trained model in this script's process, where ``model`` holds the whole weights after fit.
Other runs: ``--use-gpu``, ``--num-workers 4``, ``--precision bf16-mixed``, ``--n-layer 8
--n-embd 256`` for a larger model, ``--ckpt-path PATH`` to resume (also at another number
of workers). ``python -m raylight.consolidate CHECKPOINT_DIR model.ckpt`` turns the sharded
checkpoint into one Lightning ``.ckpt``.
"""

import argparse
import math
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import raylight as pl
from raylight.strategies import FSDPStrategy

VAL_FRACTION = 0.1


def load_text() -> str:
    """Python's help pages, in a fixed order (the dict's own order could change)."""
    return "".join(topics[name] for name in sorted(topics))


class CharWindows(Dataset):
    """Windows of ``block_size + 1`` characters every ``stride`` characters: the input is the
    first ``block_size``, the target the same window shifted by one."""

    def __init__(self, ids: Tensor, block_size: int, stride: int) -> None:
        self.ids, self.block_size, self.stride = ids, block_size, stride

    def __len__(self) -> int:
        return (len(self.ids) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index * self.stride
        window = self.ids[start : start + self.block_size + 1]
        return window[:-1], window[1:]  # (T,), (T,)


class TextDataModule(pl.LightningDataModule):
    """The text's first 90% for training (windows every ``stride`` characters, shuffled by the
    Trainer's sampler), the last 10% for validation (windows that do not overlap)."""

    def __init__(self, vocab: str, block_size: int, batch_size: int, stride: int) -> None:
        super().__init__()
        self.vocab, self.block_size = vocab, block_size
        self.batch_size, self.stride = batch_size, stride

    def setup(self, stage: str | None = None) -> None:
        # Every rank reads the text itself: it is local and the same on every machine.
        index = {char: i for i, char in enumerate(self.vocab)}
        ids = torch.tensor([index[char] for char in load_text()], dtype=torch.long)
        split = int(len(ids) * (1 - VAL_FRACTION))
        self.train_set = CharWindows(ids[:split], self.block_size, self.stride)
        self.val_set = CharWindows(ids[split:], self.block_size, self.block_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(batch, time, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time, channels))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; the unit FSDP gathers and frees as a whole."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharGPT(pl.LightningModule):
    """A decoder-only transformer over the characters of ``vocab``."""

    def __init__(
        self,
        vocab: str,
        block_size: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.token_embedding = nn.Embedding(len(vocab), n_embd)
        self.position_embedding = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, len(vocab), bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab) logits

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        ids, targets = batch
        logits = self(ids)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # Each rank sees its share of the windows: sync_dist averages over the ranks.
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict:
        # nanoGPT's split: decay the matrices (linear and embedding weights), not the biases
        # and LayerNorm gains. Under FSDP these are the ranks' shards (DTensors); .dim() is the
        # whole parameter's, so the split is the same as on one device.
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=(0.9, 0.95),
        )
        total_steps = max(1, self.trainer.estimated_stepping_batches)
        warmup_steps = min(self.hparams.warmup_steps, total_steps // 2)

        def warmup_then_cosine(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))  # down to lr / 10

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    @torch.no_grad()
    def generate(self, prompt: str, num_chars: int, temperature: float = 0.8, seed: int = 0) -> str:
        """Continue ``prompt`` by sampling ``num_chars`` characters, one at a time."""
        index = {char: i for i, char in enumerate(self.hparams.vocab)}
        ids = torch.tensor([[index[char] for char in prompt]], device=self.device)  # (1, T)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self.eval()
        for _ in range(num_chars):
            logits = self(ids[:, -self.hparams.block_size :])[:, -1, :]  # (1, vocab)
            probabilities = F.softmax(logits / temperature, dim=-1)
            next_id = torch.multinomial(probabilities, 1, generator=generator)  # (1, 1)
            ids = torch.cat([ids, next_id], dim=1)
        return "".join(self.hparams.vocab[i] for i in ids[0].tolist())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=2, help="ranks, each holding a shard")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--max-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--block-size", type=int, default=64, help="context, in characters")
    parser.add_argument("--stride", type=int, default=64, help="characters between windows")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--precision", default="32-true", help="or bf16-mixed, bf16-true")
    parser.add_argument(
        "--sharding-strategy",
        default="FULL_SHARD",
        choices=["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"],
    )
    parser.add_argument("--limit-train-batches", type=float, default=1.0, help="per epoch")
    parser.add_argument("--limit-val-batches", type=float, default=1.0)
    parser.add_argument("--sample-chars", type=int, default=300, help="0: no sample")
    parser.add_argument(
        "--default-root-dir", default=None, help="logs and checkpoints (default: cwd)"
    )
    parser.add_argument("--ckpt-path", default=None, help='a sharded checkpoint, or "last"')
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def _limit(value: float) -> int | float:
    """Lightning's convention: 1.0 is a fraction (all batches), 5.0 means 5 batches."""
    return int(value) if value > 1 else value


def main(argv: list[str] | None = None) -> float:
    """Validate, fit; print the val loss before and after, and a sample; return the final one."""
    args = _parse_args(argv)
    pl.seed_everything(args.seed)
    vocab = "".join(sorted(set(load_text())))
    model = CharGPT(
        vocab,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        lr=args.lr,
    )
    datamodule = TextDataModule(vocab, args.block_size, args.batch_size, args.stride)
    trainer = pl.Trainer(
        strategy=FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=args.sharding_strategy),
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        precision=args.precision,
        max_epochs=args.max_epochs,
        limit_train_batches=_limit(args.limit_train_batches),
        limit_val_batches=_limit(args.limit_val_batches),
        gradient_clip_val=1.0,
        default_root_dir=args.default_root_dir,
    )
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters / 1e6:.2f}M parameters, {len(vocab)} characters, {args.num_workers} ranks")
    # The untrained model's loss is about ln(len(vocab)): the figure training must beat.
    (before,) = trainer.validate(model, datamodule=datamodule)
    trainer.fit(model, datamodule=datamodule, ckpt_path=args.ckpt_path)
    val_loss = float(trainer.callback_metrics["val_loss"])  # the last epoch's, on the driver
    checkpoint = trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path
    if checkpoint:
        print(f"sharded checkpoint: {checkpoint}")
    if args.sample_chars > 0:
        print("sample:\n" + model.generate("The ", args.sample_chars, seed=args.seed))
    print(f"val loss before training: {before['val_loss']:.3f}")
    print(f"val loss: {val_loss:.3f}")
    return val_loss


if __name__ == "__main__":
    main()
