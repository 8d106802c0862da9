"""Turn a sharded checkpoint (``Trainer(strategy="fsdp")``) into one Lightning ``.ckpt``.

    python -m raylight.consolidate lightning_logs/version_0/checkpoints/epoch=0-step=8.ckpt full.ckpt

Either argument may be a storage URI (``s3://bucket/run/...ckpt``). The output holds full,
unsharded CPU tensors under ``state_dict`` and ``optimizer_states``, as a single-process run
writes them, so ``load_from_checkpoint``, ``torch.load`` and pytorch-lightning read it. The
whole checkpoint is held in memory at once. It loads ``weights_only``; for a checkpoint you
trust whose hyperparameters hold custom objects, set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``.
Exit code 2: the input is not a complete sharded checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from raylight.shared import checkpoint, sharded, storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raylight.consolidate",
        description="Write one Lightning .ckpt from a sharded checkpoint directory.",
    )
    parser.add_argument("sharded_checkpoint", help="the sharded checkpoint's directory or URI")
    parser.add_argument("output", help="the .ckpt file to write (a path or URI)")
    args = parser.parse_args(argv)
    try:
        sharded.check_complete(args.sharded_checkpoint)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    checkpoint.save(sharded.read_full(args.sharded_checkpoint), args.output)
    print(f"wrote {storage.redact(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
