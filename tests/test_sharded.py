"""Sharded checkpoints (Lightning's FSDP format through DCP), written for real by two FSDP2
ranks, on a local path and on a real S3 server."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as multiprocessing
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from raylight import consolidate
from raylight.shared import checkpoint, sharded, storage

META = {
    "epoch": 2,
    "global_step": 24,
    "hyper_parameters": {"hidden": 16, "betas": (0.9, 0.999)},
    "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.25)}},
}
# Each optimizer's parameters in the order it was built with: the ids of an ordinary
# Optimizer.state_dict().
OPTIMIZER_PARAMETERS = [["0.weight", "0.bias", "3.weight", "3.bias"], ["1.weight", "1.bias"]]
WORLD_SIZE = 2


def _model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    # 3 output rows: a parameter that two ranks shard unevenly; BatchNorm: buffers too.
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _optimizers(model: nn.Sequential) -> list[torch.optim.Optimizer]:
    adam = torch.optim.Adam(
        [
            {"params": model[0].parameters(), "lr": 1e-2},
            {"params": model[3].parameters(), "lr": 1e-3},
        ]
    )
    return [adam, torch.optim.SGD(model[1].parameters(), lr=0.1, momentum=0.9)]


def _train(model: nn.Sequential, optimizers: list[torch.optim.Optimizer], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        model(torch.randn(4, 8, generator=generator)).square().mean().backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def _sharded_model(world_size: int, seed: int) -> tuple[nn.Sequential, list]:
    model = _model(seed)
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[3], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, _optimizers(model)


def _state(model: nn.Sequential, optimizers: list, full: bool = False) -> dict:
    """Lightning's DCP state dict: sharded, or (``full``) gathered onto rank 0's CPU."""
    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    state = {"model": get_model_state_dict(model, options=options)}
    for index, optimizer in enumerate(optimizers):
        state[f"optimizer_{index}"] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


def _load_sharded(model: nn.Sequential, optimizers: list, location: str) -> None:
    state = _state(model, optimizers)
    dcp.load(state, storage_reader=sharded.storage_reader(location), planner=sharded.load_planner())
    set_model_state_dict(model, state["model"])
    for index, optimizer in enumerate(optimizers):
        set_optimizer_state_dict(model, optimizer, state[f"optimizer_{index}"])


def _save_and_reload(
    rank: int,
    store: str,
    locations: dict[str, str],
    async_location: str,
    pieces: dict[str, str],
    results: str,
) -> None:
    """One of two ranks: train, save to every location (and once with async_save, and once
    in pieces, one rank at a time), then load each back into freshly built ranks; rank 0
    keeps the full states for the test to compare."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        model, optimizers = _sharded_model(WORLD_SIZE, seed=0)
        # The same batches on both ranks: FSDP does not sync buffers (BatchNorm's running
        # statistics) and DCP keeps one rank's copy of what is not sharded.
        _train(model, optimizers, seed=0)
        state = _state(model, optimizers)
        for location in locations.values():
            if rank == 0:
                sharded.save_meta(location, META)
            dcp.save(state, storage_writer=sharded.storage_writer(location))
        if rank == 0:
            sharded.save_meta(async_location, META)
        writes = dist.new_group(backend="gloo")
        dcp.async_save(
            state, storage_writer=sharded.storage_writer(async_location), process_group=writes
        ).result()
        # Each rank's piece while the other waits outside any collective: a piece needing
        # one would hang here.
        lacking: dict[str, list] = {where: [] for where in pieces}
        for turn in range(WORLD_SIZE):
            if rank == turn:
                meta = {**META, "raylight": {"rng_states": [f"rank {rank}'s"]}}
                for where, location in pieces.items():
                    sharded.save_piece(location, rank, state, meta, group="fit@host:1 step 24")
                    lacking[where].append(sharded.join_pieces(location, WORLD_SIZE))
            dist.barrier()
        joins: list = [None] * WORLD_SIZE
        dist.all_gather_object(joins, lacking)
        reloaded = {}
        for where, location in locations.items():
            fresh, fresh_optimizers = _sharded_model(WORLD_SIZE, seed=1)
            _load_sharded(fresh, fresh_optimizers, location)
            reloaded[where] = _state(fresh, fresh_optimizers, full=True)
        reference = _state(model, optimizers, full=True)
        if rank == 0:
            torch.save({"reference": reference, "reloaded": reloaded, "joins": joins}, results)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, s3_server):
    """One sharded checkpoint per storage kind, written by two ranks; their full state."""
    folder = tmp_path_factory.mktemp("sharded")
    locations = {
        "local": str(folder / "epoch=2-step=24.ckpt"),
        "s3": storage.join(s3_server, "sharded", "epoch=2-step=24.ckpt"),
    }
    async_location, results = str(folder / "async.ckpt"), str(folder / "results.pt")
    pieces = {
        "local": str(folder / "on_exception.ckpt"),
        "s3": storage.join(s3_server, "sharded", "on_exception.ckpt"),
    }
    multiprocessing.spawn(
        _save_and_reload,
        args=(str(folder / "store"), locations, async_location, pieces, results),
        nprocs=WORLD_SIZE,
    )
    outcome = torch.load(results, weights_only=True)
    return {"locations": locations, "async": async_location, "pieces": pieces, **outcome}


def _assert_same(actual, expected, where: str = "") -> None:
    """Equal structure and bit-identical tensors (same dtype, same values)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


def _assert_ordinary_optimizer(actual: dict, fqn_keyed: dict, names: list[str]) -> None:
    """``actual`` is ``fqn_keyed`` with parameters numbered in the order they were built."""
    numbered = [number for group in actual["param_groups"] for number in group["params"]]
    assert numbered == list(range(len(names)))
    saved_order = [name for group in fqn_keyed["param_groups"] for name in group["params"]]
    assert saved_order == names
    for group, expected in zip(actual["param_groups"], fqn_keyed["param_groups"], strict=True):
        assert {k: v for k, v in group.items() if k != "params"} == {
            k: v for k, v in expected.items() if k != "params"
        }
    assert sorted(actual["state"]) == list(range(len(names)))
    for number, name in enumerate(names):
        _assert_same(actual["state"][number], fqn_keyed["state"][name], name)


def _scratch(where: str, tmp_path: Path, s3_server: str, name: str) -> str:
    """A fresh location of the same storage kind as ``where``."""
    if where == "local":
        return str(tmp_path / name)
    return storage.join(s3_server, "scratch", tmp_path.name, name)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_full_is_the_saved_state_bit_exactly_in_ordinary_form(saved, where):
    full = sharded.read_full(saved["locations"][where])
    reference = saved["reference"]
    _assert_same({key: full[key] for key in META}, META)
    _assert_same(full["state_dict"], reference["model"])
    assert len(full["optimizer_states"]) == len(OPTIMIZER_PARAMETERS)
    for index, names in enumerate(OPTIMIZER_PARAMETERS):
        _assert_ordinary_optimizer(
            full["optimizer_states"][index], reference[f"optimizer_{index}"], names
        )
    # What a single-process (DDP) run does with it: load it into a plain model and step.
    model = _model(seed=5)
    model.load_state_dict(full["state_dict"])
    optimizers = _optimizers(model)
    for optimizer, state in zip(optimizers, full["optimizer_states"], strict=True):
        optimizer.load_state_dict(state)
    _train(model, optimizers, seed=0)
    assert optimizers[0].state_dict()["state"][2]["step"].item() == 6  # 3 saved + 3 more


def test_async_save_writes_the_same_checkpoint(saved):
    full = sharded.read_full(saved["async"])
    _assert_same(full["state_dict"], saved["reference"]["model"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_fresh_ranks_load_it_back(saved, where):
    _assert_same(saved["reloaded"][where], saved["reference"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_rank_loads_it_resharded(saved, where, process_group):
    model, optimizers = _sharded_model(world_size=1, seed=1)
    _load_sharded(model, optimizers, saved["locations"][where])
    _assert_same(_state(model, optimizers, full=True), saved["reference"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_pieces_written_without_collectives_join_into_the_same_checkpoint(saved, where):
    """OnExceptionCheckpoint under FSDP: rank 0's piece alone is not a checkpoint; rank 1's
    completes it, with every rank's generator states."""
    assert [rank_joins[where] for rank_joins in saved["joins"]] == [
        ["rank 1 wrote no piece"],
        [None],
    ]
    location = saved["pieces"][where]
    sharded.check_complete(location)
    joined = sharded.read_full(location)
    assert joined.pop("raylight") == {"rng_states": ["rank 0's", "rank 1's"]}
    assert "raylight_piece_of" not in joined
    _assert_same(joined, sharded.read_full(saved["locations"][where]))
    _assert_same(joined["state_dict"], saved["reference"]["model"])


def test_pieces_of_different_saves_or_a_missing_piece_never_join(saved, tmp_path):
    """A rank killed mid-piece (no index) or a piece from another save leaves the checkpoint
    incomplete."""
    for case in ("cut short", "another save"):
        location = str(tmp_path / case)
        storage.copy_tree(saved["pieces"]["local"], location)
        for name in (".metadata", sharded.META_NAME):
            os.remove(os.path.join(location, name))
        if case == "cut short":
            os.remove(os.path.join(location, "__1.metadata"))
            expected = "rank 1 wrote no piece"
        else:
            path = os.path.join(location, "meta.1.pt")
            other = torch.load(path, weights_only=True)
            other["raylight_piece_of"] = "fit@host:2 step 24"
            torch.save(other, path)
            expected = "the pieces are from different saves"
        assert sharded.join_pieces(location, WORLD_SIZE).startswith(expected)
        with pytest.raises(FileNotFoundError, match="incomplete"):
            sharded.check_complete(location)


def test_pytorch_lightning_reads_it(saved):
    from lightning_fabric.utilities.load import _load_distributed_checkpoint
    from pytorch_lightning.utilities.consolidate_checkpoint import _format_checkpoint

    full = _format_checkpoint(_load_distributed_checkpoint(Path(saved["locations"]["local"])))
    assert full["epoch"] == META["epoch"] and full["global_step"] == META["global_step"]
    _assert_same(full["state_dict"], saved["reference"]["model"])
    _assert_same(full["optimizer_states"][1], saved["reference"]["optimizer_1"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_only_a_directory_with_both_files_is_complete(saved, where, tmp_path, s3_server):
    location = saved["locations"][where]
    assert sharded.is_sharded(location)
    sharded.check_complete(location)
    plain = _scratch(where, tmp_path, s3_server, "plain.ckpt")
    checkpoint.save({"state_dict": {}}, plain)
    assert not sharded.is_sharded(plain)
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint"):
        sharded.check_complete(plain)

    incomplete = _scratch(where, tmp_path, s3_server, "interrupted.ckpt")
    storage.copy_tree(location, incomplete)
    storage.delete(storage.join(incomplete, ".metadata"))
    assert sharded.is_sharded(incomplete)
    message = r"incomplete: it lacks \.metadata .* use an earlier checkpoint"
    with pytest.raises(FileNotFoundError, match=message):
        sharded.check_complete(incomplete)
    with pytest.raises(FileNotFoundError, match=message):
        sharded.read_full(incomplete)

    storage.copy_tree(location, incomplete)
    storage.delete(storage.join(incomplete, sharded.META_NAME))
    with pytest.raises(FileNotFoundError, match="it lacks meta.pt"):
        sharded.check_complete(incomplete)
    with pytest.raises(FileNotFoundError, match="not found"):
        sharded.check_complete(_scratch(where, tmp_path, s3_server, "never.ckpt"))


def test_an_index_that_would_run_code_is_refused(saved, tmp_path):
    class RunsCode:
        def __reduce__(self):
            return os.makedirs, (str(tmp_path / "ran"),)

    crafted = str(tmp_path / "crafted.ckpt")
    storage.copy_tree(saved["locations"]["local"], crafted)
    storage.write_bytes(storage.join(crafted, ".metadata"), pickle.dumps(RunsCode()))
    with pytest.raises(pickle.UnpicklingError, match="not part of a checkpoint index"):
        sharded.read_full(crafted)
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_consolidate_writes_one_lightning_checkpoint(saved, where, tmp_path, s3_server):
    output = _scratch(where, tmp_path, s3_server, "full.ckpt")
    command = [sys.executable, "-m", "raylight.consolidate", saved["locations"][where], output]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "secret" not in finished.stdout and "test:test" not in finished.stdout
    full = torch.load(io.BytesIO(storage.read_bytes(output)), weights_only=True)
    _assert_same(full["state_dict"], saved["reference"]["model"])
    _assert_ordinary_optimizer(
        full["optimizer_states"][0], saved["reference"]["optimizer_0"], OPTIMIZER_PARAMETERS[0]
    )
    assert full["global_step"] == META["global_step"]


def test_consolidate_refuses_an_incomplete_or_plain_checkpoint(saved, tmp_path, capsys):
    incomplete = str(tmp_path / "interrupted.ckpt")
    storage.copy_tree(saved["locations"]["local"], incomplete)
    storage.delete(storage.join(incomplete, ".metadata"))
    assert consolidate.main([incomplete, str(tmp_path / "out.ckpt")]) == 2
    assert "use an earlier checkpoint" in capsys.readouterr().err
    plain = str(tmp_path / "plain.ckpt")
    checkpoint.save({"state_dict": {}}, plain)
    assert consolidate.main([plain, str(tmp_path / "out.ckpt")]) == 2
    assert "not a sharded checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()


def test_overwriting_removes_the_old_index_before_the_new_shards(
    tmp_path, process_group, monkeypatch
):
    location = str(tmp_path / "last.ckpt")
    model, optimizers = _sharded_model(world_size=1, seed=0)
    sharded.save_meta(location, META)
    dcp.save(_state(model, optimizers), storage_writer=sharded.storage_writer(location))
    _train(model, optimizers, seed=0)
    index_present_at_shard_write = []
    write_bytes = storage.write_bytes

    def recording_write_bytes(target: str, data: bytes) -> None:
        if target.endswith(".distcp"):
            index = storage.join(os.path.dirname(target), ".metadata")
            index_present_at_shard_write.append(storage.exists(index))
        write_bytes(target, data)

    monkeypatch.setattr(storage, "write_bytes", recording_write_bytes)
    dcp.save(_state(model, optimizers), storage_writer=sharded.storage_writer(location))
    assert index_present_at_shard_write == [False]
    _assert_same(sharded.read_full(location)["state_dict"], _state(model, [], full=True)["model"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_delete_checkpoint_removes_a_directory_a_file_or_only_a_link(
    saved, where, tmp_path, s3_server
):
    copy = _scratch(where, tmp_path, s3_server, "copy.ckpt")
    storage.copy_tree(saved["locations"][where], copy)
    plain = _scratch(where, tmp_path, s3_server, "plain.ckpt")
    checkpoint.save({"state_dict": {}}, plain)
    if where == "local":
        link = str(tmp_path / "last.ckpt")
        storage.link(copy, link)
        sharded.delete_checkpoint(link)
        assert not os.path.lexists(link)
        sharded.check_complete(copy)  # what the link named is untouched
    sharded.delete_checkpoint(copy)
    sharded.delete_checkpoint(plain)
    assert not storage.exists(copy) and not storage.exists(plain)
    sharded.delete_checkpoint(copy)  # already gone: nothing to do


def test_the_driver_node_runs_the_new_calls_only_inside_the_run(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    (run / "a.ckpt").mkdir(parents=True)
    (run / "a.ckpt" / "shard").write_bytes(b"x")
    outside.mkdir()
    served = storage.DriverNodeStorage([str(run)])
    served.call("makedirs", str(run / "b.ckpt"))
    served.call("rename", str(run / "a.ckpt" / "shard"), str(run / "b.ckpt" / "shard"))
    assert (run / "b.ckpt" / "shard").read_bytes() == b"x"
    served.call("delete_tree", str(run / "b.ckpt"), first=("shard",))
    assert not (run / "b.ckpt").exists()
    for name, args in [
        ("makedirs", (str(outside / "new"),)),
        ("rename", (str(run / "a.ckpt"), str(outside / "a.ckpt"))),
        ("delete_tree", (str(outside),)),
        ("delete_tree", (str(run),)),
    ]:
        with pytest.raises(PermissionError):
            served.call(name, *args)
    assert outside.exists() and run.exists()
