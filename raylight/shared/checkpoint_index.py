"""The run's checkpoint index, kept in storage beside the checkpoints.

A checkpoint is committed once its file is written; the index is updated after that, so
every entry names a complete file. It lives at the run's root (``default_root_dir``), so a new
driver process finds "last" and "best" there, whichever version directory they are in. Both
the driver (resize checkpoints, resolving ``ckpt_path``) and rank 0 (``ModelCheckpoint``,
clean stops) write it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from raylight.shared import storage

INDEX_NAME = ".raylight-checkpoints.json"


def _read_index(root: str) -> list[dict[str, Any]]:
    location = storage.join(root, INDEX_NAME)
    if not storage.exists(location):
        return []
    return json.loads(storage.read_bytes(location))["checkpoints"]


def index_entry(
    path: str,
    *,
    epoch: int,
    global_step: int,
    run_id: str | None,
    monitor: str | None = None,
    score: float | None = None,
    weights_only: bool = False,
) -> dict[str, Any]:
    """What the index records of a checkpoint taken at ``epoch`` / ``global_step`` by the
    fit ``run_id``."""
    return {
        "path": path,
        "epoch": epoch,
        "global_step": global_step,
        "monitor": monitor,
        "score": score,
        "run": run_id,
        "weights_only": weights_only,
    }


def update_index(root: str, added: dict[str, Any] | None, removed: list[str]) -> None:
    """Record ``added`` (stamped with the commit time) and forget ``removed``."""
    entries = [e for e in _read_index(root) if e["path"] not in removed]
    if added is not None:
        added = {**added, "time": time.time()}
        entries = [e for e in entries if e["path"] != added["path"]] + [added]
    document = {"checkpoints": entries}
    storage.write_bytes(storage.join(root, INDEX_NAME), json.dumps(document, indent=1).encode())


def latest_in_index(root: str) -> str | None:
    entries = [e for e in _read_index(root) if storage.exists(e["path"])]
    if not entries:
        return None
    return max(entries, key=lambda e: e["time"])["path"]  # the newest commit, of any run


def latest_of_run(root: str, run_id: str, up_to_step: int | None = None) -> dict[str, Any] | None:
    """The newest full (not weights-only) checkpoint that fit ``run_id`` committed, taken
    at global step ``up_to_step`` or before when that is given."""
    entries = [
        e
        for e in _read_index(root)
        if e.get("run") == run_id
        and not e.get("weights_only")
        and (up_to_step is None or e["global_step"] <= up_to_step)
        and storage.exists(e["path"])
    ]
    return max(entries, key=lambda e: e["time"]) if entries else None


def best_in_index(root: str, monitor: str, mode: str) -> str | None:
    scored = [
        e
        for e in _read_index(root)
        if e.get("monitor") == monitor and e.get("score") is not None and storage.exists(e["path"])
    ]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda e: e["score"])["path"]
