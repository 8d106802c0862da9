"""The README's main job and the MNIST example run as a user runs them: a fresh process that
starts its own embedded Ray."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mnist_data import write_mnist

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _run(args: list[str], timeout: int = 300) -> str:
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh embedded instance, not the tests' one
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


EXAMPLES = ["digits", "mnist", "image_classifier", "elastic", "tune_digits"]
REQUIRED = {"image_classifier": ["--data-dir", "images"]}


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_takes_the_cluster_flags(name):
    """The flags the README's cluster section passes through ray submit and ray job submit."""
    module = importlib.import_module(f"examples.{name}")
    args = module._parse_args(
        [*REQUIRED.get(name, []), "--num-workers", "3", "--use-gpu", "--max-epochs", "4",
         "--default-root-dir", "s3://bucket/runs", "--ckpt-path", "s3://bucket/runs/last.ckpt"]
    )  # fmt: skip
    assert (args.num_workers, args.use_gpu, args.max_epochs) == (3, True, 4)
    assert args.default_root_dir == "s3://bucket/runs"
    assert args.ckpt_path == "s3://bucket/runs/last.ckpt"


def _accuracy(output: str) -> float:
    match = re.search(r"test accuracy: ([0-9.]+)\s*$", output)
    assert match, output[-2000:]
    return float(match.group(1))


def test_digits_main_job_reaches_95_percent(tmp_path):
    output = _run(["examples/digits.py", "--default-root-dir", str(tmp_path)])
    assert _accuracy(output) >= 0.95
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))


def test_mnist_example_on_generated_idx_files(tmp_path):
    write_mnist(tmp_path, n_train=600, n_test=100)
    output = _run(
        [
            "examples/mnist.py",
            "--data-dir",
            str(tmp_path),
            "--max-epochs",
            "1",
            "--num-workers",
            "2",
            "--default-root-dir",
            str(tmp_path / "root"),
        ]
    )
    assert _accuracy(output) >= 0.9


def test_elastic_example_recovers_from_a_killed_worker(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "local"}
    args = ["examples/elastic.py", "--kill-at-step", "40", "--max-epochs", "10"]
    result = subprocess.run(
        [sys.executable, *args, "--default-root-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "exiting hard at step 40" in result.stdout
    assert "failure 1 of the run" in result.stderr
    assert re.search(
        r"restarting the workers from \S*recovery-epoch=\d-step=\d+\.ckpt", result.stderr
    )
    match = re.search(r"test accuracy: ([0-9.]+) after (\d+) steps", result.stdout)
    assert match and float(match.group(1)) >= 0.9, result.stdout[-2000:]


def test_tune_example_runs_an_asha_sweep_of_distributed_trials(tmp_path):
    args = ["examples/tune_digits.py", "--num-samples", "2", "--max-epochs", "2"]
    output = _run([*args, "--default-root-dir", str(tmp_path)], timeout=600)
    assert "best config: {'lr': " in output
    assert _accuracy(output) >= 0.8
