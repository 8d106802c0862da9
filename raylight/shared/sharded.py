"""Sharded checkpoints: every rank writes its own shards through ``torch.distributed.checkpoint``.

The format is Lightning's FSDPStrategy sharded format, so pytorch-lightning reads it too. A
checkpoint is a directory named like a file (``epoch=0-step=8.ckpt/``) holding:

- ``__<rank>_0.distcp``: each rank's shards of ``{"model": <model state dict>,
  "optimizer_0": <optimizer state dict>, ...}``, the optimizer dicts FQN-keyed as
  ``get_optimizer_state_dict`` returns them;
- ``.metadata``: DCP's index of those shards, written by its coordinator after every rank's
  shards are in;
- ``meta.pt`` (``META_NAME``): the rest of the Lightning checkpoint dict, ``torch.save``-d by
  rank 0 (``save_meta``).

A checkpoint is complete when both ``.metadata`` and ``meta.pt`` exist. Rank 0 writes
``meta.pt`` before the shards, so that ``.metadata`` is always the last file of a save;
overwriting a checkpoint removes its ``.metadata`` first, so that while the new shards land the
directory reads as incomplete rather than as a mix of two saves.

A save on an exception (``OnExceptionCheckpoint``) cannot count on collectives: each rank that
raises writes a piece of its own (``save_piece``: its shards, DCP's per-rank index
``__<rank>.metadata`` and ``meta.<rank>.pt``), and whichever rank finds every rank's piece in,
all from the same step of the same group, joins them (``join_pieces``) into ``meta.pt`` and
``.metadata``, last: the same format, read the same way.

Every file goes through ``storage``, so a sharded checkpoint lives wherever a ``.ckpt`` can:
a local path (routed to the driver's node where this node cannot see it) or a storage URI.
Reading loads nothing that runs code unless the caller trusts the files (``weights_only``,
as ``checkpoint.load``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import os
import pickle
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem, SavePlan
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict_saver import _save_state_dict
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

from raylight.shared import checkpoint, storage

META_NAME = "meta.pt"
_INDEX_NAME = ".metadata"  # DCP's name for its index of the shards
_MODEL_KEY = "model"
_OPTIMIZER_PREFIX = "optimizer_"


class _ShardBuffer(io.BytesIO):
    """DCP closes the stream it writes before ``create_stream`` exits, which would drop the
    bytes before they are uploaded; they are dropped with ``release`` instead."""

    def close(self) -> None:
        pass

    def release(self) -> None:
        super().close()


class _StorageFileSystem(FileSystemBase):
    """DCP's file operations on ``storage`` locations (strings, never ``Path``: a URI's
    ``//`` and query string must survive)."""

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        location = os.fspath(path)
        if mode == "rb":
            # Whole file in memory: DCP's reader seeks to each tensor's offset.
            yield io.BytesIO(storage.read_bytes(location))
            return
        if mode != "wb":
            raise ValueError(f"create_stream opens files for 'rb' or 'wb', not {mode!r}.")
        buffer = _ShardBuffer()
        try:
            yield buffer
            # One atomic write: a reader never sees a part of a shard.
            storage.write_bytes(location, buffer.getvalue())
        finally:
            buffer.release()

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return storage.join(os.fspath(path), suffix)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        storage.rename(os.fspath(path), os.fspath(new_path))

    def init_path(self, path: str | os.PathLike) -> str:
        return os.fspath(path)

    def mkdir(self, path: str | os.PathLike) -> None:
        storage.makedirs(os.fspath(path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, str | os.PathLike)

    def exists(self, path: str | os.PathLike) -> bool:
        return storage.exists(os.fspath(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        storage.delete(os.fspath(path))


class _Writer(FileSystemWriter):
    def __init__(self, location: str) -> None:
        # One file per rank and one thread keep memory at one shard's bytes; no fsync here,
        # because storage.write_bytes syncs local files itself and a BytesIO cannot.
        super().__init__(location, single_file_per_rank=True, sync_files=False, thread_count=1)
        self.fs = _StorageFileSystem()
        self.path = self.fs.init_path(location)
        self._is_coordinator = False

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)
        self._is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # The coordinator's local plan is done before any rank gets its global plan and
        # writes: the old index is gone before the first new shard lands.
        if self._is_coordinator:
            storage.delete(storage.join(self.path, _INDEX_NAME))
        return super().prepare_local_plan(plan)

    def storage_meta(self) -> StorageMeta | None:
        # DCP pickles this into .metadata: the location without its credentials.
        return StorageMeta(checkpoint_id=storage.redact(str(self.path)), save_id=self.save_id)


class _PieceWriter(_Writer):
    """One rank's shards without any collective: its data file ``__<rank>_0.distcp`` and its
    own index ``__<rank>.metadata`` (DCP's per-rank form, ``use_collectives=False``)."""

    def __init__(self, location: str, rank: int) -> None:
        super().__init__(location)
        self._rank = rank

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        # Without a process group DCP calls every process rank 0.
        kwargs.update(rank=self._rank, use_collectives=False)
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)

    def _metadata_exists(self) -> bool:
        return False  # save_piece removed this rank's older piece; no overwrite warning


class _Reader(FileSystemReader):
    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.fs = _StorageFileSystem()
        self.path = self.fs.init_path(location)

    # No ``rank`` argument: DCP then does not fall back to per-rank index files, which this
    # format never has, so a missing or refused .metadata fails with its own error.
    def read_metadata(self) -> Metadata:
        path = self._get_metadata_path()
        metadata = _IndexUnpickler(io.BytesIO(storage.read_bytes(path))).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _IndexUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle of plain records: DCP's dataclasses and enums, torch
    sizes and dtypes. Only those load, so a crafted file runs nothing (DCP itself
    unpickles it in full)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INDEX_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint."):
            found = super().find_class(module, name)
            if dataclasses.is_dataclass(found) or _is_enum(found):
                return found
        raise pickle.UnpicklingError(
            f"{module}.{name} is not part of a checkpoint index: the .metadata file is not one "
            "torch.distributed.checkpoint wrote, or was changed since."
        )


# Beyond DCP's own records: what torch sizes, dtypes and layouts pickle as.
_INDEX_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


def _is_enum(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, enum.Enum)


def _load_object(planner: DefaultLoadPlanner, read_item: ReadItem, value: io.BytesIO) -> None:
    """DCP's ``load_bytes`` with ``torch.load(weights_only=...)`` in place of its
    ``weights_only=False``: the non-tensor entries (param groups, counters) are plain data."""
    loaded = torch.load(value, weights_only=planner.weights_only)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], loaded)
    else:
        planner.state_dict[read_item.dest_index.fqn] = loaded


class _LoadPlanner(DefaultLoadPlanner):
    def __init__(self, weights_only: bool | None) -> None:
        super().__init__()
        self.weights_only = weights_only

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_object(self, read_item, value)


class _FullStatePlanner(_EmptyStateDictLoadPlanner):
    """Rebuilds the whole saved state (full tensors) from the index alone, without a model."""

    def __init__(self, weights_only: bool | None) -> None:
        super().__init__()
        self.weights_only = weights_only

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_object(self, read_item, value)


def storage_writer(location: str) -> StorageWriter:
    """DCP's writer for ``dcp.save``/``dcp.async_save`` into the directory ``location``."""
    return _Writer(location)


def storage_reader(location: str) -> StorageReader:
    """DCP's reader for ``dcp.load`` from the directory ``location``."""
    return _Reader(location)


def load_planner(weights_only: bool | None = None) -> DefaultLoadPlanner:
    """DCP's default load planner, but loading the saved non-tensor entries ``weights_only``
    (``None``: torch's default, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns off)."""
    return _LoadPlanner(weights_only)


def is_sharded(location: str) -> bool:
    """Whether ``location`` is a sharded checkpoint's directory (complete or not)."""
    if any(storage.exists(storage.join(location, name)) for name in (_INDEX_NAME, META_NAME)):
        return True
    return any(name.endswith(".distcp") for name in storage.list_names(location))


def check_complete(location: str) -> None:
    """Raise ``FileNotFoundError`` unless ``location`` holds both ``.metadata`` and
    ``meta.pt``, saying which is missing and what to do."""
    missing = [
        name
        for name in (_INDEX_NAME, META_NAME)
        if not storage.exists(storage.join(location, name))
    ]
    if not missing:
        return
    where = storage.redact(location)
    if len(missing) == 2 and not storage.exists(location):
        raise FileNotFoundError(f"Checkpoint at {where} not found: check the path.")
    pieces = [name for name in storage.list_names(location) if name.startswith("meta.")]
    if len(missing) == 2 and pieces:
        raise FileNotFoundError(
            f"Sharded checkpoint at {where} is incomplete: it holds the pieces of only some "
            f"ranks ({', '.join(pieces)}): an OnExceptionCheckpoint under FSDP completes only "
            "when every rank raised. The save was interrupted; use an earlier checkpoint."
        )
    if len(missing) == 2:
        raise FileNotFoundError(
            f"{where} is not a sharded checkpoint: it holds neither .metadata nor {META_NAME}. "
            "Give a checkpoint directory written by Trainer(strategy='fsdp'); if it is one, its "
            "save was interrupted: use an earlier checkpoint."
        )
    explanation = {
        _INDEX_NAME: ".metadata (DCP writes it last, once every rank's shards are in)",
        META_NAME: f"{META_NAME} (the epoch, step, loops and callbacks, written by rank 0)",
    }[missing[0]]
    raise FileNotFoundError(
        f"Sharded checkpoint at {where} is incomplete: it lacks {explanation}. The save was "
        "interrupted; use an earlier checkpoint."
    )


def save_meta(location: str, meta: dict[str, Any]) -> None:
    """Write ``meta.pt`` (rank 0 only), atomically; before the shards, so that ``.metadata``
    stays the last file of a save."""
    checkpoint.save(meta, storage.join(location, META_NAME))


def load_meta(location: str, weights_only: bool | None = None) -> dict[str, Any]:
    """``meta.pt``, loaded as ``checkpoint.load`` loads a ``.ckpt``."""
    return checkpoint.load(storage.join(location, META_NAME), weights_only=weights_only)


def _piece_index(rank: int) -> str:
    return f"__{rank}{_INDEX_NAME}"  # DCP's name for a rank's own index


def _piece_meta(rank: int) -> str:
    return f"meta.{rank}.pt"


def save_piece(
    location: str, rank: int, tensors: dict[str, Any], meta: dict[str, Any], group: str
) -> None:
    """Write this rank's piece of a checkpoint with no collective (the other ranks may be
    blocked in one, or gone): ``meta`` (this rank's view: its own generator states) and its
    shards of ``tensors``. ``group`` names the process group and step, so that pieces of
    different saves are never joined. The checkpoint's ``.metadata`` and ``meta.pt`` go
    first: from here until ``join_pieces`` the directory reads as incomplete."""
    for name in (_INDEX_NAME, META_NAME, _piece_index(rank)):
        storage.delete(storage.join(location, name))
    checkpoint.save({**meta, "raylight_piece_of": group}, storage.join(location, _piece_meta(rank)))
    _save_state_dict(
        tensors, storage_writer=_PieceWriter(location, rank), no_dist=True, use_collectives=False
    )  # its index last: a piece without one was cut short


def join_pieces(location: str, world_size: int) -> str | None:
    """Make ``location`` one complete checkpoint from every rank's piece, once all
    ``world_size`` are in and from the same save; None once done, else why not (yet). Any
    rank may call it after writing its piece: joining twice writes the same files."""
    metas = []
    indexes = []
    for rank in range(world_size):
        index = storage.join(location, _piece_index(rank))
        if not storage.exists(index):
            return f"rank {rank} wrote no piece"
        metas.append(checkpoint.load(storage.join(location, _piece_meta(rank))))
        indexes.append(_IndexUnpickler(io.BytesIO(storage.read_bytes(index))).load())
    groups = {meta.pop("raylight_piece_of") for meta in metas}
    if len(groups) > 1:
        return f"the pieces are from different saves ({sorted(groups)})"
    meta = metas[0]
    meta["raylight"]["rng_states"] = [m["raylight"]["rng_states"][0] for m in metas]
    save_meta(location, meta)
    joined = _joined_index(indexes)
    joined.storage_meta = StorageMeta(checkpoint_id=storage.redact(location))
    storage.write_bytes(storage.join(location, _INDEX_NAME), pickle.dumps(joined))
    return None


def _joined_index(indexes: list[Metadata]) -> Metadata:
    """One DCP index from the ranks' own: every distinct chunk of each tensor (a replicated
    one once), and each non-tensor entry from the lowest rank that wrote it."""
    entries: dict[str, Any] = {}
    storage_data: dict[MetadataIndex, Any] = {}
    planner_data: dict[str, Any] = {}
    for index in indexes:
        planner_data.update(index.planner_data or {})
        for key, info in index.storage_data.items():
            storage_data.setdefault(key, info)
        for fqn, entry in index.state_dict_metadata.items():
            known = entries.setdefault(
                fqn,
                entry
                if isinstance(entry, BytesStorageMetadata)
                else TensorStorageMetadata(entry.properties, entry.size, []),
            )
            if isinstance(entry, TensorStorageMetadata):
                places = {(tuple(c.offsets), tuple(c.sizes)) for c in known.chunks}
                known.chunks.extend(
                    c for c in entry.chunks if (tuple(c.offsets), tuple(c.sizes)) not in places
                )
    return Metadata(entries, planner_data, storage_data, version=indexes[0].version)


def read_full(location: str, weights_only: bool | None = None) -> dict[str, Any]:
    """The whole sharded checkpoint as one ordinary Lightning checkpoint dict, with full CPU
    tensors: ``meta.pt``'s entries, ``state_dict`` (from ``model``) and ``optimizer_states``
    (from ``optimizer_0``, ``optimizer_1``, ..., each in ``torch.optim.Optimizer.state_dict()``
    form). Every tensor of the checkpoint is in memory at once."""
    check_complete(location)
    full = load_meta(location, weights_only)
    reader = _Reader(location)
    # Read once here too: DCP would report a crafted or corrupt index only wrapped in its own
    # errors.
    reader.read_metadata()
    saved: dict[str, Any] = {}
    try:
        _load_state_dict(
            saved, storage_reader=reader, planner=_FullStatePlanner(weights_only), no_dist=True
        )
    except CheckpointException as error:
        # A BaseException, which `except Exception` misses; with one process there is one
        # failure, and it is the error to raise (a missing shard, unreachable storage).
        [(failure, _)] = error.failures.values()
        raise failure from None
    if _MODEL_KEY not in saved:
        raise ValueError(
            f"Sharded checkpoint at {storage.redact(location)} holds no '{_MODEL_KEY}' entry "
            f"(it holds {sorted(saved)}): it is not in Lightning's sharded format."
        )
    full["state_dict"] = saved.pop(_MODEL_KEY)
    count = sum(1 for key in saved if key.startswith(_OPTIMIZER_PREFIX))
    full["optimizer_states"] = [
        _ordinary_optimizer_state(saved.pop(f"{_OPTIMIZER_PREFIX}{index}"))
        for index in range(count)
    ]
    full.update(saved)
    return full


def _ordinary_optimizer_state(fqn_keyed: dict[str, Any]) -> dict[str, Any]:
    """``get_optimizer_state_dict``'s form (parameters named by FQN) as
    ``Optimizer.state_dict()``'s: parameters numbered 0, 1, ... in the order the param groups
    list them, which is the order the optimizer was built with."""
    ids: dict[Any, int] = {}
    param_groups = []
    for group in fqn_keyed["param_groups"]:
        params = [ids.setdefault(name, len(ids)) for name in group["params"]]
        param_groups.append({**group, "params": params})
    state = {ids[name]: value for name, value in fqn_keyed.get("state", {}).items()}
    return {"state": dict(sorted(state.items())), "param_groups": param_groups}


def link(target: str, location: str) -> None:
    """``ModelCheckpoint(save_last="link")`` for a sharded checkpoint: a symlink to the
    directory on local storage; on object stores, which have no links, a copy. The copy
    deletes the older one first and writes ``.metadata`` last, so one cut short is never read
    as complete."""
    if not storage.is_uri(location):
        storage.link(target, location)
        return
    delete_checkpoint(location)
    for name in sorted(storage.list_names(target), key=lambda name: name == _INDEX_NAME):
        storage.copy_file(storage.join(target, name), storage.join(location, name))


def delete_checkpoint(location: str) -> None:
    """Delete a checkpoint: a ``.ckpt`` file, a link to one, or a sharded directory. Its
    ``.metadata`` and ``meta.pt`` go first, so an interrupted delete leaves an incomplete
    checkpoint, never one that looks complete with shards missing."""
    storage.delete_tree(location, first=(_INDEX_NAME, META_NAME))
