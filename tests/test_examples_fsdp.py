"""The sharded-training example (examples/fsdp_gpt.py) as a user runs it, at tiny sizes: a
fresh process with its own embedded Ray, 2 CPU workers, 30 training batches."""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
    "--batch-size", "16", "--limit-train-batches", "30", "--limit-val-batches", "4",
    "--sample-chars", "20",
]  # fmt: skip


def test_the_example_takes_the_cluster_flags():
    """The flags the README's cluster section passes through ray submit and ray job submit."""
    module = importlib.import_module("examples.fsdp_gpt")
    args = module._parse_args(
        ["--num-workers", "3", "--use-gpu", "--max-epochs", "4",
         "--default-root-dir", "s3://bucket/runs", "--ckpt-path", "s3://bucket/runs/last.ckpt"]
    )  # fmt: skip
    assert (args.num_workers, args.use_gpu, args.max_epochs) == (3, True, 4)
    assert args.default_root_dir == "s3://bucket/runs"
    assert args.ckpt_path == "s3://bucket/runs/last.ckpt"


def _loss(name: str, output: str) -> float:
    match = re.search(rf"^{name}: ([0-9.naif]+)$", output, re.MULTILINE)
    assert match, output[-3000:]
    return float(match.group(1))


@pytest.mark.slow
def test_fsdp_gpt_learns_and_writes_a_sharded_checkpoint(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh embedded instance, not the tests' one
    result = subprocess.run(
        [sys.executable, "examples/fsdp_gpt.py", *TINY, "--default-root-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before = _loss("val loss before training", result.stdout)
    after = _loss("val loss", result.stdout)
    assert math.isfinite(after) and after < before, result.stdout[-3000:]
    # An untrained model predicts about uniformly over the ~100 characters: loss ~ ln(100).
    assert 4.0 < before < 5.5
    assert "sample:\nThe " in result.stdout
    (checkpoint,) = tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").is_file()
