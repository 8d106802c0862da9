"""Real public LightningModules (tests/corpus/) run under raylight and under pytorch-lightning.

Each corpus script is a public repository's Lightning code with only its import, its data
source and its Trainer's scaling and length flags changed (its header lists the changes). The
test runs it twice, side by side, as a user would: ``--framework raylight`` (two CPU workers, a
fresh embedded Ray) and ``--framework lightning`` (one CPU device), and compares the final
metrics each prints as its last line of JSON.

How close the two must be. Both start from the same weights (the scripts seed torch before the
model is built) and take the same number of optimizer steps, but raylight's two workers each
read half of every epoch (a DistributedSampler) and average two batches per step, where
Lightning reads one batch per step. So the curves are two samples of the same training, not
the same numbers. Each case states, per metric:

- ``close``: a relative tolerance between the two values, sized for that sampling noise after a
  few steps on a learnable task (losses near the same point of the curve);
- ``floor`` / ``ceiling``: a bound both runs must reach, chosen well past what an untrained
  model scores (chance accuracy, the initial loss), so a run that did not train fails;
- ``equal``: counts that do not depend on the data order (images logged, predictions made).

A script that raylight cannot run yet is marked ``xfail(strict=True)``: its raylight run must
fail with the named error (another failure fails the test), and once the missing feature lands
the strict mark turns the pass into a failure, asking for the mark to go.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "corpus"
RUN_TIMEOUT_S = 300
pytestmark = [pytest.mark.slow, pytest.mark.e2e]


class RaylightGap(AssertionError):
    """The raylight run failed with the error its case names: a feature raylight lacks."""


@dataclass(frozen=True)
class Case:
    name: str
    close: dict[str, float] = field(default_factory=dict)
    floor: dict[str, float] = field(default_factory=dict)
    ceiling: dict[str, float] = field(default_factory=dict)
    equal: tuple[str, ...] = ()
    # Counts each rank makes alone: limit_predict_batches limits every rank, in raylight as
    # under Lightning's DDP, so raylight's two workers make twice what one Lightning device does.
    per_rank: tuple[str, ...] = ()
    gap: str | None = None  # the raylight error text while a feature is missing
    missing: str = ""  # what raylight lacks, for the xfail reason


CASES = [
    # BoringModel's loss is the sum of its outputs: SGD drives it down without bound, by about
    # 0.4 per step through the bias alone; untrained it sits near 0. The weights' share is a
    # random walk over the random data, so the two runs agree only on the drift's sign and size.
    Case("pl_bug_report_model", ceiling={"test_loss": -3.0}),
    Case(
        "pl_gan",
        ceiling={"d_loss": 1.5, "g_loss": 3.0},
        floor={"d_loss": 0.05, "g_loss": 0.05},
        equal=("images",),
    ),
    Case(
        "pl_autoencoder",
        close={"test_loss_epoch": 0.35},
        ceiling={"test_loss_epoch": 0.08},
        per_rank=("predicted",),
    ),
    Case(
        "pl_backbone_classifier",
        close={"test_loss": 0.1},
        ceiling={"test_loss": 2.28},
        per_rank=("predicted",),
    ),
    # 24 Adam steps at lr 2e-4: the loss has left ln(10) = 2.30 but is still high, and both
    # runs sit on the same stretch of the curve; accuracy (chance 0.1) is past 0.5 in both.
    Case(
        "tut_mnist_hello_world",
        close={"test_loss": 0.05},
        floor={"test_acc": 0.5},
        ceiling={"test_loss": 2.2},
        equal=("csv_rows",),
    ),
    # GAN losses at the last step swing by a factor of two between batches; the bounds catch a
    # collapsed or diverged GAN (d_loss near 0, g_loss large), and every step logs one image.
    Case(
        "tut_basic_gan",
        floor={"d_loss": 0.1, "g_loss": 0.1},
        ceiling={"d_loss": 1.5, "g_loss": 3.0},
        equal=("images",),
    ),
    # Three Trainers in one script. 12 steps at lr 2e-4 barely move the MNIST MLPs (the loss
    # stays near ln(10)), so there the two agree closely; the CIFAR patches are learnt fast
    # (raylight takes 8 steps, Lightning 12: each worker holds half of the 512 images).
    Case(
        "tut_datamodules",
        close={"mnist_val_loss": 0.05, "dm_val_loss": 0.05, "cifar_val_loss": 0.15},
        floor={"cifar_val_acc": 0.6},
        ceiling={"cifar_val_loss": 2.1},
    ),
    Case(
        "hydra_mnist",
        floor={"test/acc": 0.9, "val/acc_best": 0.9},
        ceiling={"val/loss": 1.0},
        close={"val/loss": 0.3},
    ),
    # lightning-bolts' LitMNIST: 16 Adam steps at lr 1e-3 take the loss from ln(10) = 2.30 to
    # about 1.4 in both (its ReLU on the logits keeps it from going much lower this early).
    Case("bolts_mnist", close={"val_loss": 0.3}, ceiling={"val_loss": 2.0}),
    # Lightning's demo Transformer on Python's pydoc text (about 9k words): four clipped SGD
    # steps leave the loss near ln(9k) = 9.1 in both, and both start from the same weights, so
    # they agree to about a percent; a diverged run (NaN, or far above ln V) fails the bound.
    Case("pl_transformer", close={"test_loss": 0.03}, ceiling={"test_loss": 9.6}),
    # A one-layer Transformer learning to reverse sequences, its cosine warm-up scheduler stepped
    # by hand in optimizer_step: 200 steps take accuracy from chance (0.1) to about 0.19 (over
    # 16k tokens, chance stays within 0.1 +- 0.01) and the loss just below its start, ln(10).
    Case(
        "tut_uva_transformers",
        close={"test_loss": 0.05},
        floor={"val_acc": 0.15, "test_acc": 0.15},
        ceiling={"test_loss": 2.25},
    ),
    # MilestonesFinetuning (BaseFinetuning) unfreezes the backbone in two steps: after the
    # second milestone the optimizer holds three parameter groups and every parameter trains.
    Case(
        "pl_finetuning",
        equal=("param_groups", "trainable"),
        ceiling={"val_loss": 2.0},
    ),
    # The UvA-DL Vision Transformer: after fit, ViT.load_from_checkpoint on the best checkpoint
    # and two tests of the loaded model. Four AdamW steps (3.2M parameters, 5 s a step on two
    # busy cores) leave it near chance, so the check is that the loaded model tests like
    # Lightning's (the loss within sampling noise of ln(10) = 2.30, none diverged).
    Case("tut_uva_vit", close={"test_loss": 0.15}, ceiling={"test_loss": 2.8}),
    # The CIFAR-10 baseline's OneCycleLR, returned as {"scheduler": ..., "interval": "step"}:
    # stepped after every optimizer step, its warm-up lifts the rate from 0.1 / 25 = 0.004 at
    # once (an epoch interval would leave it at 0.004 for the whole run). The schedule does not
    # depend on the data, so both runs log the same six rates. Six SGD steps of a ResNet-18 leave
    # the loss near ln(10) = 2.30.
    Case(
        "tut_cifar10_baseline",
        equal=("lr", "lr_rows"),
        floor={"lr": 0.004001},
        close={"test_loss": 0.1},
        ceiling={"test_loss": 2.8},
    ),
]


def _run(name: str, framework: str, workdir: Path) -> subprocess.Popen:
    workdir.mkdir()
    # RAY_ADDRESS=local: raylight starts its own embedded Ray, never joining the tests' one
    # or another on this machine.
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(CORPUS / f"{name}.py"), "--framework", framework],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # apart: Ray forwards worker logs late, after the JSON line
        text=True,
    )


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    """The exit status, stdout (ending in the JSON line) and stderr."""
    try:
        output, errors = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, errors = process.communicate()
        return -1, output, errors + f"\n(killed after {RUN_TIMEOUT_S} s)"
    return process.returncode, output, errors


def _metrics(output: str) -> dict[str, float]:
    last = output.strip().splitlines()[-1] if output.strip() else ""
    try:
        return json.loads(last)["metrics"]
    except (ValueError, KeyError) as error:
        raise AssertionError(f"no final JSON line: {output[-3000:]}") from error


def _check(case: Case, name: str, metrics: dict[str, float]) -> None:
    for key, bound in case.floor.items():
        assert metrics[key] >= bound, f"{name}: {key}={metrics[key]:.4f} below {bound}"
    for key, bound in case.ceiling.items():
        assert metrics[key] <= bound, f"{name}: {key}={metrics[key]:.4f} above {bound}"


def _param(case: Case):
    if case.gap is None:
        return pytest.param(case, id=case.name)
    reason = f"raylight fails with {case.gap!r}: {case.missing}"
    return pytest.param(
        case, id=case.name, marks=pytest.mark.xfail(strict=True, raises=RaylightGap, reason=reason)
    )


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_corpus_script_agrees_with_lightning(case: Case, tmp_path):
    raylight = _run(case.name, "raylight", tmp_path / "raylight")
    lightning = _run(case.name, "lightning", tmp_path / "lightning")
    lightning_rc, lightning_out, lightning_err = _finish(lightning)
    raylight_rc, raylight_out, raylight_err = _finish(raylight)

    assert lightning_rc == 0, f"the Lightning run failed:\n{lightning_err[-3000:]}"
    expected = _metrics(lightning_out)
    if raylight_rc != 0:
        if case.gap is not None and case.gap in raylight_err:
            raise RaylightGap(f"{case.gap}: {case.missing}")
        raise AssertionError(f"the raylight run failed:\n{raylight_err[-3000:]}")
    actual = _metrics(raylight_out)

    _check(case, "lightning", expected)
    _check(case, "raylight", actual)
    for key in case.equal:
        assert actual[key] == expected[key], (
            f"{key}: raylight {actual[key]}, Lightning {expected[key]}"
        )
    for key in case.per_rank:
        assert actual[key] == 2 * expected[key], (
            f"{key}: raylight {actual[key]} over 2 workers, Lightning {expected[key]} on 1 device"
        )
    for key, rtol in case.close.items():
        assert actual[key] == pytest.approx(expected[key], rel=rtol), (
            f"{key}: raylight {actual[key]:.4f}, Lightning {expected[key]:.4f} (rel {rtol})"
        )


def test_every_corpus_script_has_a_case():
    scripts = {path.stem for path in CORPUS.glob("*.py") if not path.stem.startswith("_")}
    assert scripts == {case.name for case in CASES}
