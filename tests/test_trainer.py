"""fit / validate / test / predict on 2 real Ray workers with a gloo process group."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from models import Classifier, DataModule, IndexedDataset, loader, make_dataset
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import raylight as pl

pytestmark = pytest.mark.slow


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        num_workers=2, enable_progress_bar=False, logger=False, enable_checkpointing=False
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _records(directory: Path) -> list[dict]:
    rows = []
    for path in sorted(directory.glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def _record(directory: str, rank: int, **row) -> None:
    with open(os.path.join(directory, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


# ---- parity with a plain torch DDP loop ---------------------------------------------------------
def _plain_ddp(rank: int, world: int, port: int, init_state: dict, out: str, epochs: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    model = Classifier()
    model.load_state_dict(init_state)
    ddp = DistributedDataParallel(model)
    dataset = make_dataset()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0)
    data = DataLoader(dataset, batch_size=16, sampler=sampler)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in data:
            loss = F.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_weights_match_plain_ddp_bit_for_bit(ray_session, tmp_path):
    torch.manual_seed(3)
    model = Classifier()
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_plain_ddp, args=(2, _free_port(), init_state, out, 3), nprocs=2, join=True)
    expected = torch.load(out)

    trainer = _trainer(max_epochs=3)
    trainer.fit(model, train_dataloaders=loader(shuffle=True))

    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), f"{name} differs from plain DDP"
    assert not torch.equal(model.state_dict()["layer.0.weight"], init_state["layer.0.weight"])
    assert trainer.global_step == 3 * 4
    assert trainer.current_epoch == 3


# ---- the distributed sampler ---------------------------------------------------------------------
class RecordsIndices(Classifier):
    def __init__(self, record_dir: str) -> None:
        super().__init__()
        self.record_dir = record_dir

    def training_step(self, batch, batch_idx):
        _record(
            self.record_dir,
            self.global_rank,
            epoch=self.current_epoch,
            indices=batch[2].tolist(),
            batch_size=len(batch[2]),
        )
        return super().training_step(batch, batch_idx)


def test_each_epoch_splits_the_data_between_ranks_and_reshuffles(ray_session, tmp_path):
    model = RecordsIndices(str(tmp_path))
    train = DataLoader(IndexedDataset(64), batch_size=8, shuffle=True)
    _trainer(max_epochs=2).fit(model, train)

    rows = _records(tmp_path)
    assert {row["batch_size"] for row in rows} == {8}  # the loader's batch_size is kept
    per_epoch = {}
    for path in tmp_path.glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            per_epoch.setdefault(row["epoch"], {}).setdefault(path.stem, []).extend(row["indices"])
    for epoch in (0, 1):
        rank0, rank1 = per_epoch[epoch]["rank0"], per_epoch[epoch]["rank1"]
        assert len(rank0) == len(rank1) == 32
        assert not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == list(range(64))
    assert per_epoch[0]["rank0"] != per_epoch[1]["rank0"]  # set_epoch reshuffles


# ---- what fit leaves on the driver, and the follow-up calls ----------------------------------------
def test_fit_then_validate_test_predict_reuse_the_workers(ray_session):
    model = Classifier()
    datamodule = DataModule()
    trainer = _trainer(max_epochs=2)
    trainer.fit(model, datamodule=datamodule)
    group = trainer._group
    assert set(trainer.callback_metrics) == {"train_loss", "val_loss"}
    assert trainer.progress_bar_metrics.keys() == {"train_loss", "val_loss"}
    assert model.hparams.lr == 0.1

    validated = trainer.validate(model, datamodule=datamodule)
    tested = trainer.test(model, datamodule=datamodule)
    predictions = trainer.predict(model, datamodule=datamodule)
    assert trainer._group is group  # the same live workers

    assert list(validated[0]) == ["val_loss"] and validated[0]["val_loss"] > 0
    assert list(tested[0]) == ["test_acc"] and 0.0 <= tested[0]["test_acc"] <= 1.0
    # Predictions come back in dataset order and match the driver's copy of the weights.
    datamodule.setup("predict")
    x = datamodule.val_set.tensors[0]
    assert torch.equal(torch.cat(predictions), model(x).argmax(1))
    assert tested[0]["test_acc"] == pytest.approx(
        (model(x).argmax(1) == datamodule.val_set.tensors[1]).float().mean().item(), abs=1e-6
    )


class LogsEverything(Classifier):
    def training_step(self, batch, batch_idx):
        self.log("both", float(batch_idx), on_step=True, on_epoch=True)
        self.log("rank_mean", float(self.global_rank), on_step=False, on_epoch=True, sync_dist=True)
        self.log("rank_local", float(self.global_rank), on_step=False, on_epoch=True)
        self.log(
            "rank_max", float(self.global_rank), on_epoch=True, reduce_fx="max", sync_dist=True
        )
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        gathered = self.all_gather(torch.tensor(float(self.global_rank)))
        self.log("gathered_sum", gathered.sum())
        self.log("gathered_len", float(len(gathered)))


def test_log_semantics_across_ranks(ray_session):
    trainer = _trainer(max_epochs=1, limit_train_batches=4)
    trainer.fit(LogsEverything(), loader(), loader())
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert metrics["both_epoch"] == pytest.approx(1.5)  # mean of batch_idx 0..3
    assert metrics["both_step"] == 3.0
    assert metrics["both"] == pytest.approx(1.5)  # after epoch end, the epoch value
    assert metrics["rank_mean"] == pytest.approx(0.5)
    assert metrics["rank_local"] == 0.0  # the driver shows rank 0's unsynced value
    assert metrics["rank_max"] == 1.0
    assert metrics["gathered_sum"] == 1.0 and metrics["gathered_len"] == 2.0
    assert "both_step" in trainer.logged_metrics and "both" not in trainer.logged_metrics


# ---- loop control flags ----------------------------------------------------------------------------
class CountsHooks(Classifier):
    def __init__(self, record_dir: str) -> None:
        super().__init__()
        self.record_dir = record_dir

    def on_validation_start(self):
        if self.global_rank == 0:
            _record(
                self.record_dir,
                0,
                hook="val",
                sanity=self.trainer.sanity_checking,
                step=self.global_step,
            )


@pytest.mark.parametrize(
    ("flags", "steps", "val_steps"),
    [
        (dict(max_epochs=3, limit_train_batches=2), 6, [None, 2, 4, 6]),
        (dict(max_steps=5, max_epochs=10), 5, [None, 4]),
        (dict(max_epochs=1, val_check_interval=0.5, num_sanity_val_steps=0), 4, [2, 4]),
        (dict(max_epochs=2, check_val_every_n_epoch=2, num_sanity_val_steps=0), 8, [8]),
        (dict(fast_dev_run=True), 1, [1]),
        (dict(max_epochs=2, accumulate_grad_batches=2), 4, [None, 2, 4]),
    ],
)
def test_loop_flags(ray_session, tmp_path, flags, steps, val_steps):
    trainer = _trainer(**flags)
    trainer.fit(CountsHooks(str(tmp_path)), loader(), loader())
    assert trainer.global_step == steps
    seen = [None if row["sanity"] else row["step"] for row in _records(tmp_path)]
    assert seen == val_steps


def test_gradient_accumulation_matches_a_larger_batch(ray_session):
    torch.manual_seed(0)
    accumulated, single = Classifier(), Classifier()
    single.load_state_dict(accumulated.state_dict())
    _trainer(max_epochs=1, accumulate_grad_batches=2).fit(accumulated, loader(batch_size=8))
    _trainer(max_epochs=1).fit(single, loader(batch_size=16))
    for name, value in accumulated.state_dict().items():
        torch.testing.assert_close(value, single.state_dict()[name], rtol=1e-5, atol=1e-6)


class ReturnsNone(Classifier):
    def training_step(self, batch, batch_idx):
        return None


def test_training_step_returning_none_skips_the_batch(ray_session):
    model = ReturnsNone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _trainer(max_epochs=1).fit(model, loader())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_bounds_the_update(ray_session, algorithm):
    model = Classifier(lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    _trainer(max_steps=1, gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm).fit(
        model, loader()
    )
    change = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert change.abs().max() > 0
    if algorithm == "norm":
        assert change.norm() <= 1e-3 * 1.0001
    else:
        assert change.abs().max() <= 1e-3 * 1.0001


# ---- optimizers and schedulers -----------------------------------------------------------------------
class WithSchedulers(Classifier):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form

    def on_train_epoch_start(self):
        self.log("lr_at_epoch_start", self.optimizers().param_groups[0]["lr"])

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("flat", 1.0)  # never improves: a patience-0 plateau scheduler must cut the lr

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        if self.form == "epoch":
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)]
        if self.form == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.9)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 2},
            }
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.1)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.form},
        }


@pytest.mark.parametrize(
    ("form", "expected_lr"),
    [("epoch", 0.1 * 0.5**2), ("step", 0.1 * 0.9**4), ("flat", 0.1 * 0.1)],
)
def test_lr_schedulers_step_on_their_interval(ray_session, form, expected_lr):
    trainer = _trainer(max_epochs=3)
    trainer.fit(WithSchedulers(form), loader(), loader())
    assert trainer.callback_metrics["lr_at_epoch_start"].item() == pytest.approx(expected_lr)


def test_plateau_scheduler_without_its_metric_names_the_available_ones(ray_session):
    with pytest.raises(ValueError, match=r"conditioned on metric 'missing'.*val_loss"):
        _trainer(max_epochs=1).fit(WithSchedulers("missing"), loader(), loader())


class ManualGAN(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.head = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        logits = self(x)
        # One backward per DDP forward: both losses go through it together.
        loss = F.cross_entropy(logits, y) + self.head(logits.detach()).pow(2).mean()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        self.log("n_optimizers", float(len(self.optimizers())))
        self.log("no_schedulers", float(self.lr_schedulers() is None))

    def on_train_epoch_end(self):
        # Each rank saw other data: equal weights prove manual_backward synced gradients.
        flat = torch.cat([p.detach().flatten() for p in self.parameters()])
        checksums = self.all_gather(flat.sum())
        self.log("ranks_agree", float(torch.all(checksums == checksums[0])))

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.layer.parameters(), lr=0.1),
            torch.optim.SGD(self.head.parameters(), lr=0.1),
        ]


def test_manual_optimization_with_two_optimizers(ray_session):
    model = ManualGAN()
    head_before = model.head.weight.clone()
    trainer = _trainer(max_epochs=1)
    trainer.fit(model, loader())
    assert trainer.global_step == 2 * 4  # each optimizer step counts, as in Lightning
    assert not torch.equal(model.head.weight, head_before)
    assert trainer.callback_metrics["n_optimizers"].item() == 2.0
    assert trainer.callback_metrics["ranks_agree"].item() == 1.0
    assert trainer.callback_metrics["no_schedulers"].item() == 1.0


# ---- precision, environment, data hooks ------------------------------------------------------------
class ReportsEnvironment(Classifier):
    def training_step(self, batch, batch_idx):
        logits = self(batch[0])
        self.log("bf16_forward", float(logits.dtype == torch.bfloat16))
        self.log("threads", float(torch.get_num_threads()))
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE"):
            self.log(
                f"env_{name}",
                float(os.environ[name]),
                on_epoch=True,
                reduce_fx="max",
                sync_dist=True,
            )
        return F.cross_entropy(logits.float(), batch[1])


def test_workers_get_torchrun_environment_and_bf16_autocast(ray_session):
    trainer = _trainer(max_epochs=1, precision="bf16-mixed")
    trainer.fit(ReportsEnvironment(), loader())
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert metrics["bf16_forward"] == 1.0
    assert metrics["threads"] == 1.0  # OMP threads follow the worker's CPUs
    assert metrics["env_RANK"] == 1.0 and metrics["env_WORLD_SIZE"] == 2.0
    assert metrics["env_LOCAL_RANK"] == 1.0 and metrics["env_LOCAL_WORLD_SIZE"] == 2.0
    assert metrics["env_NODE_RANK"] == 0.0


class RecordingDataModule(DataModule):
    def __init__(self, record_dir: str) -> None:
        super().__init__()
        self.record_dir = record_dir

    def prepare_data(self):
        _record(self.record_dir, int(os.environ["RANK"]), hook="prepare_data")

    def setup(self, stage):
        _record(self.record_dir, int(os.environ["RANK"]), hook=f"setup:{stage}")
        super().setup(stage)


def test_prepare_data_once_per_node_and_setup_on_every_rank(ray_session, tmp_path):
    trainer = _trainer(max_epochs=1)
    trainer.fit(Classifier(), datamodule=RecordingDataModule(str(tmp_path)))
    hooks_by_rank = {
        path.stem: [json.loads(line)["hook"] for line in path.read_text().splitlines()]
        for path in tmp_path.glob("*.jsonl")
    }
    assert hooks_by_rank == {"rank0": ["prepare_data", "setup:fit"], "rank1": ["setup:fit"]}


# ---- smaller Lightning behaviours ---------------------------------------------------------------
class TwoValLoaders(Classifier):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("which", float(dataloader_idx))
        self.log_dict({"constant": 1.0})


def test_several_eval_loaders_get_dataloader_idx(ray_session):
    trainer = _trainer(max_epochs=1)
    model = TwoValLoaders()
    results = trainer.validate(model, dataloaders=[loader(), loader(batch_size=8)])
    assert results == [
        {"which/dataloader_idx_0": 0.0, "constant/dataloader_idx_0": 1.0},
        {"which/dataloader_idx_1": 1.0, "constant/dataloader_idx_1": 1.0},
    ]


class StopsAtOnce(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


@pytest.mark.parametrize(("min_epochs", "epochs_run"), [(None, 1), (3, 3)])
def test_should_stop_respects_min_epochs(ray_session, min_epochs, epochs_run):
    trainer = _trainer(max_epochs=5, min_epochs=min_epochs, callbacks=[StopsAtOnce()])
    trainer.fit(Classifier(), loader())
    assert trainer.current_epoch == epochs_run
    assert trainer.global_step == 4 * epochs_run


def test_fractional_limit_and_no_distributed_sampler(ray_session, tmp_path):
    model = RecordsIndices(str(tmp_path))
    trainer = _trainer(max_epochs=1, limit_train_batches=0.5, use_distributed_sampler=False)
    trainer.fit(model, DataLoader(IndexedDataset(64), batch_size=8))
    assert trainer.global_step == 4  # half of the 8 batches each rank now sees
    by_rank = {}
    for path in tmp_path.glob("rank*.jsonl"):
        by_rank[path.stem] = [
            i for line in path.read_text().splitlines() for i in json.loads(line)["indices"]
        ]
    assert by_rank["rank0"] == by_rank["rank1"] == list(range(32))  # no sampler: same data


class Replacement(pl.Callback):
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def on_train_start(self, trainer, pl_module):
        pl_module.log("replacement_is_model_s", float(self.tag == "model"))


class ConfiguresCallbacks(Classifier):
    def configure_callbacks(self):
        return [Replacement("model")]

    def on_train_start(self):
        self.log("device_is_cpu", float(self.device == torch.device("cpu")))
        self.log(
            "local_rank", float(self.local_rank), on_epoch=True, reduce_fx="max", sync_dist=True
        )


def test_configure_callbacks_replaces_trainer_callbacks_of_the_same_type(ray_session):
    trainer = _trainer(max_epochs=1, callbacks=[Replacement("trainer")])
    trainer.fit(ConfiguresCallbacks(), loader())
    assert trainer.callback_metrics["replacement_is_model_s"].item() == 1.0
    assert trainer.callback_metrics["device_is_cpu"].item() == 1.0
    assert trainer.callback_metrics["local_rank"].item() == 1.0


class RecordsException(pl.Callback):
    def __init__(self, record_dir: str) -> None:
        self.record_dir = record_dir

    def on_exception(self, trainer, pl_module, exception):
        _record(self.record_dir, trainer.global_rank, error=type(exception).__name__)


class Raises(Classifier):
    def training_step(self, batch, batch_idx):
        raise KeyError("boom")


def test_on_exception_runs_on_the_failing_rank(ray_session, tmp_path):
    with pytest.raises(KeyError):
        _trainer(max_epochs=1, callbacks=[RecordsException(str(tmp_path))]).fit(Raises(), loader())
    assert {"error": "KeyError"} in _records(tmp_path)


class OneCycle(Classifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches
        self.total_steps = float(total)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_train_start(self):
        self.log("total_steps", self.total_steps)


def test_estimated_stepping_batches_in_configure_optimizers(ray_session):
    trainer = _trainer(max_epochs=2)
    trainer.fit(OneCycle(), loader())  # OneCycleLR raises if stepped past total_steps
    assert trainer.callback_metrics["total_steps"].item() == 8.0
    assert trainer.global_step == 8


def test_no_training_batches_skips_fit_and_eval_keeps_progress(ray_session):
    empty = _trainer(max_epochs=5, limit_train_batches=0)
    empty.fit(Classifier(), loader())
    assert empty.global_step == 0 and empty.current_epoch == 0

    trainer = _trainer(max_epochs=1)
    model = Classifier()
    trainer.fit(model, loader())
    trainer.test(model, loader())
    assert trainer.global_step == 4 and trainer.current_epoch == 1  # test leaves them alone
    with pytest.raises(RuntimeError, match="completed trainer.fit"):
        trainer.save_checkpoint("unused.ckpt")
