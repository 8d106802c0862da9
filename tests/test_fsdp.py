"""Sharded training (``strategy="fsdp"``) on 2 real Ray workers with gloo: parity with a
hand-written FSDP2 loop, Lightning's hook order, sharded checkpoints and resume at the same
and at another world size."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from models import Classifier, ScriptedScore, loader, make_dataset
from torch.utils.data import DataLoader, DistributedSampler

import raylight as pl
from raylight.shared import checkpoint, sharded, storage
from raylight.strategies import FSDPStrategy

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        num_workers=2,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        strategy=FSDPStrategy(auto_wrap_policy={torch.nn.Linear}),
    )
    return pl.Trainer(**{**defaults, **kwargs})


class ClippedAdam(Classifier):
    """Adam (state to shard) and norm clipping (a norm reduced across the shards)."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


# ---- parity with a hand-written FSDP2 loop -------------------------------------------------------
def _plain_fsdp(rank: int, world: int, port: int, init_state: dict, out: str, epochs: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    mesh = init_device_mesh("cpu", (world,))
    model = Classifier()
    model.load_state_dict(init_state)
    for layer in reversed([m for m in model.modules() if isinstance(m, torch.nn.Linear)]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dataset = make_dataset()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0)
    data = DataLoader(dataset, batch_size=16, sampler=sampler)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank == 0:
        torch.save(full, out)
    dist.destroy_process_group()


def test_weights_match_a_hand_written_fsdp2_loop_bit_for_bit(ray_session, tmp_path):
    torch.manual_seed(3)
    model = ClippedAdam()
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_plain_fsdp, args=(2, _free_port(), init_state, out, 2), nprocs=2, join=True)
    expected = torch.load(out)

    trainer = _trainer(max_epochs=2, gradient_clip_val=0.5)
    trainer.fit(model, train_dataloaders=loader(shuffle=True))

    assert set(model.state_dict()) == set(expected)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), f"{name} differs from the FSDP2 loop"
    assert not torch.equal(model.state_dict()["layer.0.weight"], init_state["layer.0.weight"])
    assert trainer.global_step == 2 * 4


class ShardReport(pl.Callback):
    """What a rank sees of its parameters: DTensors, and the size of its own shard."""

    def on_train_end(self, trainer, pl_module):
        weight = pl_module.layer[0].weight
        self.seen = {
            "type": type(weight).__name__,
            "local_rows": weight.to_local().shape[0],
            "global_rows": weight.shape[0],
            "mesh": tuple(trainer.strategy.device_mesh.shape),
        }


def test_each_rank_holds_half_of_every_parameter_and_evaluates_through_the_shards(
    ray_session,
):
    model = ClippedAdam()
    report = ShardReport()
    trainer = _trainer(max_epochs=1, callbacks=[report], limit_val_batches=2)
    trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
    assert report.seen == {"type": "DTensor", "local_rows": 8, "global_rows": 16, "mesh": (2,)}
    assert 0 < trainer.callback_metrics["val_loss"] < 5
    # The driver's model holds plain, whole tensors again.
    assert type(model.layer[0].weight).__name__ == "Parameter"
    assert model.layer[0].weight.shape == (16, 8)


class ReportsShards(ClippedAdam):
    """Logs (or, predicting, insists on) whether each evaluation step sees shards."""

    def sharded(self):
        return float(type(self.layer[0].weight).__name__ == "DTensor")

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_sharded", self.sharded())

    def test_step(self, batch, batch_idx):
        super().test_step(batch, batch_idx)
        self.log("test_sharded", self.sharded())

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        assert self.sharded(), "predict ran on whole parameters"
        return super().predict_step(batch, batch_idx, dataloader_idx)


def test_validate_test_and_predict_of_their_own_run_sharded(ray_session, tmp_path):
    torch.manual_seed(5)
    model = ReportsShards()
    trainer = _trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=str(tmp_path))
    trainer.fit(model, loader())
    checkpoint = trainer.checkpoint_callback.best_model_path
    assert sharded.is_sharded(checkpoint)
    with torch.no_grad():
        x, y = make_dataset().tensors
        logits = model(x)
    # val_loss is rank 0's (logged without sync_dist): DDP's figure is the one to equal
    (ddp_validated,) = _trainer(strategy="ddp").validate(model, loader(batch_size=128))

    evaluator = _trainer()
    # From the driver's (trained) model, and from the sharded checkpoint into a fresh one:
    # each rank loads its own shards of it.
    (validated,) = evaluator.validate(model, loader(batch_size=128))
    (tested,) = evaluator.test(ReportsShards(), loader(batch_size=128), ckpt_path=checkpoint)
    predictions = evaluator.predict(ReportsShards(), loader(), ckpt_path=checkpoint)
    assert validated["val_sharded"] == 1.0 and tested["test_sharded"] == 1.0
    assert validated["val_loss"] == pytest.approx(ddp_validated["val_loss"], abs=1e-6)
    assert tested["test_acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert torch.equal(torch.cat(predictions), logits.argmax(1))


def test_hook_order_under_fsdp_is_lightnings(ray_session, tmp_path):
    import hook_recorder as hr
    from test_hook_order import assert_same_sequence, load_references

    reference = load_references()["datamodule"]["fit"]
    path = tmp_path / "fsdp_fit"
    _, _, RecordingCallback = hr.make_recording_classes(pl)
    trainer = pl.Trainer(
        num_workers=2,
        strategy="fsdp",
        callbacks=[RecordingCallback(path)],
        **hr.COMMON_TRAINER_KWARGS,
    )
    hr.run_stage(pl, trainer, "fit", "datamodule", path)
    records = hr.read_records(path)
    assert sorted(records) == [0, 1]
    for rank, sequence in records.items():
        assert_same_sequence(sequence, hr.expected_for_rank(reference, rank), f"fsdp rank {rank}")


# ---- sharded checkpoints and resume ---------------------------------------------------------------
def _mid_epoch_checkpoint(tmp_path, num_workers=2):
    """Fit 2 epochs saving every 3 steps. Step 6 is mid-epoch: epoch 1's second batch on 2
    workers (4 batches an epoch), epoch 0's sixth on 1 (8 batches). Returns the model and the
    step-6 checkpoint."""
    torch.manual_seed(5)
    model = ClippedAdam()
    saver = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpts"), every_n_train_steps=3, save_top_k=-1
    )
    trainer = _trainer(
        max_epochs=2, num_workers=num_workers, enable_checkpointing=True, callbacks=[saver]
    )
    trainer.fit(model, train_dataloaders=loader(shuffle=True))
    (checkpoint,) = (tmp_path / "ckpts").glob("epoch=*-step=6.ckpt")
    return model, str(checkpoint)


@pytest.fixture(scope="module")
def two_rank_run(ray_session, tmp_path_factory):
    """The 2-worker run of ``_mid_epoch_checkpoint``, shared by the tests that resume from
    it or compare with it."""
    return _mid_epoch_checkpoint(tmp_path_factory.mktemp("two_rank_run"))


def test_sharded_checkpoint_directory_and_exact_mid_epoch_resume(two_rank_run):
    uninterrupted, checkpoint = two_rank_run
    assert sharded.is_sharded(checkpoint)
    sharded.check_complete(checkpoint)
    saved = sharded.read_full(checkpoint)
    assert saved["global_step"] == 6 and saved["epoch"] == 1
    assert set(saved["state_dict"]) == set(uninterrupted.state_dict())
    assert len(saved["optimizer_states"]) == 1

    torch.manual_seed(5)
    resumed = ClippedAdam()
    trainer = _trainer(max_epochs=2)
    trainer.fit(resumed, train_dataloaders=loader(shuffle=True), ckpt_path=checkpoint)
    assert trainer.global_step == 8
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, uninterrupted.state_dict()[name]), name


@pytest.mark.parametrize(("saved_by", "resumed_by"), [(2, 1), (1, 2)])
def test_a_sharded_checkpoint_loads_resharded_at_another_world_size(
    ray_session, request, tmp_path, saved_by, resumed_by
):
    if saved_by == 2:
        _, checkpoint = request.getfixturevalue("two_rank_run")
    else:
        _, checkpoint = _mid_epoch_checkpoint(tmp_path, num_workers=saved_by)
    saved = sharded.read_full(checkpoint)
    model = ClippedAdam()
    # max_steps already reached: the fit restores the shards and stops at once.
    trainer = _trainer(max_epochs=2, max_steps=6, num_workers=resumed_by)
    trainer.fit(model, train_dataloaders=loader(shuffle=True), ckpt_path=checkpoint)
    assert trainer.global_step == 6
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["state_dict"][name]), name


class ScoredAdam(ClippedAdam):
    validation_step = ScriptedScore.validation_step
    SCORES = [*ScriptedScore.SCORES, -1.0]


def _adam_steps(checkpoint: dict) -> set[int]:
    (optimizer,) = checkpoint["optimizer_states"]
    return {int(state["step"]) for state in optimizer["state"].values()}


def test_sharded_checkpoints_top_k_last_link_and_resume_on_s3(ray_session, s3_server):
    directory = storage.join(s3_server, "fsdp", "checkpoints")

    def saver():
        return pl.callbacks.ModelCheckpoint(
            dirpath=directory,
            filename="{epoch}-{score:.1f}",
            monitor="score",
            save_top_k=2,
            save_last="link",
        )

    torch.manual_seed(5)
    model = ScoredAdam()
    trainer = _trainer(max_epochs=4, enable_checkpointing=True, callbacks=[saver()])
    trainer.fit(model, loader(), loader())
    # Epochs 0 and 2 fell out of the top 2 and were deleted from the bucket, shards and all;
    # last.ckpt is a whole copy of epoch 3's directory (object stores have no links).
    best = storage.join(directory, "epoch=3-score=0.0.ckpt")
    last = storage.join(directory, "last.ckpt")
    assert storage.list_names(directory, directories=True) == [
        "epoch=1-score=1.0.ckpt",
        "epoch=3-score=0.0.ckpt",
        "last.ckpt",
    ]
    assert storage.list_names(directory) == []  # no stray file beside the directories
    assert trainer.checkpoint_callback.best_model_path == best
    assert storage.list_names(last) == storage.list_names(best)
    for path in (best, last):
        saved = sharded.read_full(path)
        assert saved["global_step"] == 16 and _adam_steps(saved) == {16}
        for name, value in model.state_dict().items():
            assert torch.equal(value, saved["state_dict"][name]), name

    # Resume from the bucket's last.ckpt: Adam's state comes back from the shards with it.
    # Epoch 4 scores best, so epoch 1 goes and last.ckpt is replaced by epoch 4's copy.
    resumed = _trainer(max_epochs=5, enable_checkpointing=True, callbacks=[saver()])
    resumed.fit(ScoredAdam(), loader(), loader(), ckpt_path=last)
    assert resumed.global_step == 20
    assert storage.list_names(directory, directories=True) == [
        "epoch=3-score=0.0.ckpt",
        "epoch=4-score=-1.0.ckpt",
        "last.ckpt",
    ]
    assert _adam_steps(sharded.read_full(last)) == {20}


def test_a_ddp_checkpoint_resumes_under_fsdp_with_its_optimizer_state(ray_session, tmp_path):
    """A DDP ``.ckpt`` numbers the optimizer's parameters; FSDP names them, and each rank
    keeps its shard of Adam's moments. Going on from it under FSDP gives what going on under
    DDP gives (to rounding: the gradients are reduced in another order)."""
    torch.manual_seed(5)
    ddp = pl.Trainer(
        num_workers=2,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    ddp.fit(ClippedAdam(), loader())
    path = ddp.checkpoint_callback.best_model_path
    assert isinstance(next(iter(checkpoint.load(path)["optimizer_states"][0]["state"])), int)
    finished = {}
    for strategy in ("ddp", "fsdp"):
        model = ClippedAdam()
        trainer = _trainer(max_epochs=2, strategy=strategy)
        trainer.fit(model, loader(), ckpt_path=path)
        assert trainer.global_step == 8
        finished[strategy] = model.state_dict()
    fresh = ClippedAdam()  # without Adam's moments the second epoch ends elsewhere
    fresh.load_state_dict(ClippedAdam.load_from_checkpoint(path).state_dict())
    _trainer(max_epochs=1).fit(fresh, loader())
    for name, value in finished["fsdp"].items():
        torch.testing.assert_close(value, finished["ddp"][name], rtol=0, atol=1e-6)
        assert not torch.allclose(value, fresh.state_dict()[name], rtol=0, atol=1e-4), name


def test_full_state_dict_type_writes_one_lightning_ckpt(ray_session, tmp_path):
    torch.manual_seed(5)
    model = ClippedAdam()
    trainer = _trainer(
        max_epochs=1,
        strategy=FSDPStrategy(state_dict_type="full"),
        enable_checkpointing=True,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, train_dataloaders=loader())
    path = trainer.checkpoint_callback.best_model_path
    assert not sharded.is_sharded(path)
    loaded = ClippedAdam.load_from_checkpoint(path)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_weights_above_the_budget_stay_off_the_driver(ray_session, tmp_path):
    torch.manual_seed(5)
    model = ClippedAdam()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(
        max_epochs=1,
        max_driver_weights_gb=1e-9,
        enable_checkpointing=True,
        default_root_dir=str(tmp_path),
    )
    with pytest.warns(UserWarning, match="max_driver_weights_gb") as caught:
        trainer.fit(model, train_dataloaders=loader())
    message = str(caught[-1].message)
    assert trainer.checkpoint_callback.best_model_path in message
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    trained = ClippedAdam.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert not torch.equal(trained.layer[0].weight, before["layer.0.weight"])


class TwoManualSteps(Classifier):
    """Manual optimization: two optimizer steps a batch, so that the second forward must see
    the first step's weights; clipping by norm across the shards; Adam's state sharded."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        for _ in range(2):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            optimizer.zero_grad()
            self.manual_backward(loss)
            self.clip_gradients(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
            optimizer.step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


@pytest.mark.parametrize(
    ("wrap", "sharding"),
    [(None, "FULL_SHARD"), ({torch.nn.Linear}, "FULL_SHARD"), ({torch.nn.Linear}, "SHARD_GRAD_OP")],
    ids=["root-only", "linear-units", "linear-units-shard-grad-op"],
)
def test_manual_optimization_under_fsdp_matches_ddp(ray_session, wrap, sharding):
    trained = {}
    fsdp = FSDPStrategy(auto_wrap_policy=wrap, sharding_strategy=sharding)
    for strategy in ("ddp", fsdp):
        torch.manual_seed(5)
        model = TwoManualSteps()
        trainer = _trainer(max_epochs=2, strategy=strategy)
        trainer.fit(model, loader(shuffle=True))
        assert trainer.global_step == 16  # Lightning counts each optimizer step
        trained[str(strategy)] = model.state_dict()
    ddp, fsdp = trained.values()
    for name, value in fsdp.items():
        # to rounding: FSDP reduce-scatters where DDP all-reduces
        torch.testing.assert_close(value, ddp[name], rtol=0, atol=1e-6)


class DiesWritingShards(ClippedAdam):
    """Rank 1 exits hard while its shards of the epoch-1 checkpoint are being written (on
    the asynchronous save's thread), the first time only."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def on_save_checkpoint(self, checkpoint):
        if self.global_rank != 1 or checkpoint["epoch"] != 1 or os.path.exists(self.marker):
            return
        from raylight.shared import storage

        write_bytes = storage.write_bytes

        def dies_on_a_shard(location, data):
            if location.endswith(".distcp"):
                open(self.marker, "w").close()
                os._exit(1)
            write_bytes(location, data)

        storage.write_bytes = dies_on_a_shard


def test_a_rank_killed_during_an_async_sharded_save_resumes_from_the_previous_one(
    ray_session, tmp_path
):
    def fit(model, root, **kwargs):
        trainer = _trainer(
            max_epochs=3, enable_checkpointing=True, default_root_dir=str(root), **kwargs
        )
        trainer.fit(model, train_dataloaders=loader(shuffle=True))
        return trainer

    torch.manual_seed(5)
    reference = ClippedAdam()
    fit(reference, tmp_path / "reference")

    torch.manual_seed(5)
    model = DiesWritingShards(str(tmp_path / "marker"))
    with pytest.warns(UserWarning, match=r"restarting the workers from .*epoch=0-step=4\.ckpt"):
        trainer = fit(model, tmp_path / "run", max_failures=1)
    assert os.path.exists(tmp_path / "marker")
    assert trainer.global_step == 12
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    last = trainer.checkpoint_callback.best_model_path
    sharded.check_complete(last)


# ---- OnExceptionCheckpoint ----------------------------------------------------------------------
class FailsMidEpoch(ClippedAdam):
    """Raises at epoch 1, batch 2 (global step 6): on every rank, or on rank 1 only (rank 0
    then waits in a collective for it)."""

    def __init__(self, failing_ranks: tuple[int, ...] = (0, 1)) -> None:
        super().__init__()
        self.failing_ranks = failing_ranks

    def training_step(self, batch, batch_idx):
        if self.global_rank in self.failing_ranks and self.current_epoch == 1 and batch_idx == 2:
            raise RuntimeError("failing on purpose")
        return super().training_step(batch, batch_idx)


def test_on_exception_checkpoint_joins_every_ranks_shards_and_resumes_exactly(
    two_rank_run, tmp_path
):
    callback = pl.callbacks.OnExceptionCheckpoint(str(tmp_path / "crash"))
    torch.manual_seed(5)
    with pytest.raises(RuntimeError, match="failing on purpose") as raised:
        _trainer(max_epochs=2, callbacks=[callback]).fit(FailsMidEpoch(), loader(shuffle=True))
    assert not any("OnExceptionCheckpoint" in note for note in raised.value.__notes__)
    sharded.check_complete(callback.ckpt_path)
    saved = sharded.read_full(callback.ckpt_path)
    assert saved["global_step"] == 6 and saved["epoch"] == 1
    assert saved["raylight"]["batches_done"] == 2
    assert len(saved["raylight"]["rng_states"]) == 2  # each rank's own
    assert _adam_steps(saved) == {6}

    straight, _ = two_rank_run  # the same fit, uninterrupted
    resumed = ClippedAdam()
    trainer = _trainer(
        max_epochs=2, callbacks=[pl.callbacks.OnExceptionCheckpoint(str(tmp_path / "crash"))]
    )
    trainer.fit(resumed, loader(shuffle=True), ckpt_path=callback.ckpt_path)
    assert trainer.global_step == 8
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    # A fit that ends normally removes it, as Lightning's teardown does.
    assert not storage.exists(callback.ckpt_path)


def test_on_exception_checkpoint_stays_incomplete_when_one_rank_raises(ray_session, tmp_path):
    callback = pl.callbacks.OnExceptionCheckpoint(str(tmp_path / "crash"))
    with pytest.raises(RuntimeError, match="failing on purpose") as raised:
        _trainer(max_epochs=2, callbacks=[callback]).fit(
            FailsMidEpoch(failing_ranks=(1,)), loader(shuffle=True)
        )
    (note,) = [note for note in raised.value.__notes__ if "OnExceptionCheckpoint" in note]
    assert "rank(s) [1] wrote their pieces" in note and "rank 0 wrote no piece" in note
    with pytest.raises(FileNotFoundError, match="pieces of only some ranks"):
        sharded.check_complete(callback.ckpt_path)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ClippedAdam.load_from_checkpoint(callback.ckpt_path)
