"""raylight must call the Lightning hooks in exactly the order real PyTorch Lightning 2.x does.

The reference sequences live in ``tests/data/lightning_hook_order.json`` (data from a
LightningDataModule) and ``tests/data/lightning_hook_order_variants.json`` (DataLoaders passed
to the Trainer method; the module's own ``*_dataloader`` hooks).  They were recorded with
pytorch-lightning 2.6.6 by ``python tests/data/record_lightning_hook_order.py``; see
``tests/hook_recorder.py`` for what is recorded and how.

* ``test_lightning_reference_is_current`` re-records the sequences with the installed
  ``pytorch_lightning`` (skipped where it is not installed) so the stored reference cannot go
  stale.
* ``test_raylight_hook_order`` runs the same recording classes under ``raylight.Trainer`` with two
  Ray workers and checks every worker's sequence against the reference.  In a multi-process
  Lightning run ``prepare_data`` (module and datamodule) runs on local rank 0 only, so ranks > 0
  are compared to the reference without those entries (``hook_recorder.expected_for_rank``).
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import hook_recorder as hr  # noqa: E402

DATA_DIR = TESTS_DIR / "data"
REFERENCE_FILE = DATA_DIR / "lightning_hook_order.json"
VARIANTS_FILE = DATA_DIR / "lightning_hook_order_variants.json"
RECORDED_WITH = "pytorch-lightning 2.6.6"
RAYLIGHT_NUM_WORKERS = 2


def load_references() -> dict[str, dict[str, list[str]]]:
    """{source: {stage: [hook, ...]}} for every data source in ``hook_recorder.DATA_SOURCES``."""
    refs = {"datamodule": json.loads(REFERENCE_FILE.read_text())}
    refs.update(json.loads(VARIANTS_FILE.read_text()))
    return refs


def assert_same_sequence(actual: list[str], expected: list[str], what: str) -> None:
    if actual == expected:
        return
    diff = "\n".join(
        difflib.unified_diff(expected, actual, "expected (Lightning)", "actual", lineterm="", n=3)
    )
    pytest.fail(f"{what}: hook order differs from {RECORDED_WITH}\n{diff}", pytrace=False)


def test_reference_files_are_well_formed():
    refs = load_references()
    assert set(refs) == set(hr.DATA_SOURCES)
    for source, by_stage in refs.items():
        assert list(by_stage) == list(hr.STAGES), source
        for stage, seq in by_stage.items():
            assert seq and all(isinstance(h, str) and h for h in seq), (source, stage)
            # every run is bracketed the same way
            assert seq[0] == "configure_callbacks", (source, stage)
            assert seq[-1] == "teardown", (source, stage)


@pytest.mark.parametrize("source", hr.DATA_SOURCES)
@pytest.mark.parametrize("stage", hr.STAGES)
def test_lightning_reference_is_current(stage, source, tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    live = hr.record_lightning(stage, source, tmp_path)
    expected = load_references()[source][stage]
    assert_same_sequence(
        live,
        expected,
        f"live pytorch_lightning {pl.__version__} ({stage}, {source}); if the installed version "
        "changed on purpose, regenerate with `python tests/data/record_lightning_hook_order.py`",
    )


@pytest.mark.slow
@pytest.mark.parametrize("source", hr.DATA_SOURCES)
@pytest.mark.parametrize("stage", hr.STAGES)
def test_raylight_hook_order(stage, source, tmp_path, ray_session):
    import raylight

    reference = load_references()[source][stage]
    path = tmp_path / f"raylight_{source}_{stage}"
    _, _, RecordingCallback = hr.make_recording_classes(raylight)
    trainer = raylight.Trainer(
        num_workers=RAYLIGHT_NUM_WORKERS,
        callbacks=[RecordingCallback(path)],
        **hr.COMMON_TRAINER_KWARGS,
    )
    hr.run_stage(raylight, trainer, stage, source, path)

    records = hr.read_records(path)
    assert sorted(records) == list(range(RAYLIGHT_NUM_WORKERS)), (
        f"expected one record file per worker rank, got ranks {sorted(records)}"
    )
    for rank, seq in records.items():
        assert_same_sequence(
            seq, hr.expected_for_rank(reference, rank), f"raylight rank {rank} ({stage}, {source})"
        )
