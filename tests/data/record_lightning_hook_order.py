"""Regenerate the real-Lightning hook-order references used by tests/test_hook_order.py.

Run from the repository root (needs the test-only dependency ``pytorch-lightning==2.6.6``):

    python tests/data/record_lightning_hook_order.py

It runs real ``pytorch_lightning`` (one CPU process, the flags in
``hook_recorder.LIGHTNING_TRAINER_KWARGS``) with the recording classes from
``tests/hook_recorder.py`` and writes

* ``tests/data/lightning_hook_order.json``: ``{"fit": [...], "validate": [...], "test": [...],
  "predict": [...]}`` with the data coming from a LightningDataModule (the reference);
* ``tests/data/lightning_hook_order_variants.json``: ``{"dataloaders": {stage: [...]},
  "module": {stage: [...]}}`` with the DataLoaders passed straight to the Trainer method, and
  with the LightningModule's own ``*_dataloader`` hooks providing the data.

Each list holds the hook names in the order they were entered (``Callback.`` / ``DataModule.``
prefixes, module hooks bare).
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR.parent))

import hook_recorder as hr  # noqa: E402

REFERENCE_FILE = DATA_DIR / "lightning_hook_order.json"
VARIANTS_FILE = DATA_DIR / "lightning_hook_order_variants.json"


def record_all(workdir) -> dict[str, dict[str, list[str]]]:
    """{source: {stage: [hook, ...]}} for every data source and stage."""
    return {
        source: {stage: hr.record_lightning(stage, source, workdir) for stage in hr.STAGES}
        for source in hr.DATA_SOURCES
    }


def _dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def main() -> int:
    import pytorch_lightning as pl

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as workdir:
        recorded = record_all(workdir)
    _dump(recorded["datamodule"], REFERENCE_FILE)
    _dump({k: v for k, v in recorded.items() if k != "datamodule"}, VARIANTS_FILE)
    print(f"pytorch_lightning {pl.__version__}: wrote {REFERENCE_FILE} and {VARIANTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
