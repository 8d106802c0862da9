"""``Trainer(strategy=...)``: Lightning's DDP names and ``DDPStrategy``, checked on the driver,
and their settings on the ranks' DDP wrapper in real two-worker fits."""

from __future__ import annotations

import inspect
import pickle
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from models import loader

import raylight as pl
from raylight.shared.config import MisconfigurationException
from raylight.strategies import DDPStrategy

lightning = pytest.importorskip("pytorch_lightning")

# What raylight does with each of Lightning's DDPStrategy arguments: a value it honours, or
# the words its refusal must use to say what to do instead.
_HONOURED = {
    "process_group_backend": "gloo",
    "timeout": timedelta(minutes=5),
    "start_method": "spawn",
}
_REFUSAL_HINTS = {
    "accelerator": "Trainer(accelerator=",
    "parallel_devices": "Trainer(num_workers=",
    "cluster_environment": "RAY_ADDRESS",
    "checkpoint_io": "default_root_dir",
    "precision_plugin": "Trainer(precision=",
    "ddp_comm_state": "remove it",
    "ddp_comm_hook": "remove it",
    "ddp_comm_wrapper": "remove it",
    "model_averaging_period": "remove it",
}


def _lightning_arguments() -> list[str]:
    parameters = inspect.signature(lightning.strategies.DDPStrategy.__init__).parameters
    return [n for n, p in parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]


def test_every_lightning_argument_is_honoured_or_refused_by_name():
    assert set(_lightning_arguments()) == set(_HONOURED) | set(_REFUSAL_HINTS)
    for name, value in _HONOURED.items():
        DDPStrategy(**{name: value})
    for name, hint in _REFUSAL_HINTS.items():
        with pytest.raises(MisconfigurationException) as info:
            DDPStrategy(**{name: object()})
        assert f"DDPStrategy({name}=...) is not supported" in str(info.value)
        assert hint in str(info.value)
        DDPStrategy(**{name: None})  # Lightning's default asks for nothing


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"device_ids": [0]}, "Ray's placement"),
        ({"process_group": object()}, "process group"),
        ({"bucket_cap": 5}, "check its spelling"),
        ({"timeout": 60}, "datetime.timedelta"),
        ({"start_method": "thread"}, "'popen'"),
        ({"process_group_backend": "mpi"}, "'gloo' on CPU workers"),
    ],
)
def test_bad_arguments_are_named_with_the_fix(kwargs, words):
    with pytest.raises(MisconfigurationException, match=next(iter(kwargs))) as info:
        DDPStrategy(**kwargs)
    assert words in str(info.value)


def test_it_pickles_and_its_settings_reach_the_run_config():
    strategy = DDPStrategy(
        find_unused_parameters=True,
        static_graph=True,
        gradient_as_bucket_view=True,
        bucket_cap_mb=5,
        timeout=timedelta(minutes=5),
    )
    copy = pickle.loads(pickle.dumps(strategy))
    assert repr(copy) == repr(strategy) and "bucket_cap_mb=5" in repr(copy)
    config = pl.Trainer(strategy=copy, logger=False).config
    assert config.find_unused_parameters is True
    assert config.ddp_kwargs == {
        "static_graph": True,
        "gradient_as_bucket_view": True,
        "bucket_cap_mb": 5,
    }
    assert config.process_group_timeout_s == 300.0
    assert pl.Trainer(logger=False).config.ddp_kwargs == {
        "static_graph": False,
        "gradient_as_bucket_view": False,
    }


def test_lightnings_ddp_names_are_taken_and_its_other_strategies_refused():
    for name, entry in lightning.strategies.StrategyRegistry.items():
        if entry["strategy"] is lightning.strategies.DDPStrategy:
            config = pl.Trainer(strategy=name, logger=False).config
            wanted = entry["init_params"].get("find_unused_parameters", False)
            assert config.find_unused_parameters is wanted, name
            continue
        if name == "fsdp":  # Lightning's FSDP names are raylight's FSDPStrategy
            assert pl.Trainer(strategy=name, logger=False).config.fsdp is not None
            continue
        if name == "fsdp_cpu_offload":
            with pytest.raises(MisconfigurationException, match="cpu_offload=True. needs GPU"):
                pl.Trainer(strategy=name, logger=False)
            continue
        with pytest.raises(MisconfigurationException) as info:
            pl.Trainer(strategy=name, logger=False)
        assert f"Trainer(strategy={name!r}) is not supported" in str(info.value)
        assert "'ddp_find_unused_parameters_true'" in str(info.value)
        assert "DDPStrategy" in str(info.value)
    for taken in (None, "auto"):
        assert pl.Trainer(strategy=taken, logger=False).config.find_unused_parameters is False
    with pytest.raises(MisconfigurationException, match=r"='ddp_static_graph'\) is not supported"):
        pl.Trainer(strategy="ddp_static_graph", logger=False)


def test_lightnings_own_strategy_object_is_refused_with_raylights_name():
    with pytest.raises(MisconfigurationException, match="raylight.strategies"):
        pl.Trainer(strategy=lightning.strategies.DDPStrategy(), logger=False)


def test_settings_that_disagree_with_the_trainer_are_refused():
    with pytest.raises(MisconfigurationException, match="use 'gloo'.*remove process_group"):
        pl.Trainer(strategy=DDPStrategy(process_group_backend="nccl"), logger=False)
    with pytest.raises(MisconfigurationException, match="process_group_timeout_s=600.0.*one only"):
        pl.Trainer(
            strategy=DDPStrategy(timeout=timedelta(minutes=5)),
            process_group_timeout_s=600.0,
            logger=False,
        )
    same = pl.Trainer(
        strategy=DDPStrategy(timeout=timedelta(minutes=10)), process_group_timeout_s=600.0
    )
    assert same.config.process_group_timeout_s == 600.0


# ---- on two workers ---------------------------------------------------------------------------
class WithUnusedLayer(pl.LightningModule):
    """``unused`` never reaches the loss: DDP must be told to look for such parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used = torch.nn.Linear(8, 3)
        self.unused = torch.nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.used(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ReportsItsWrapper(WithUnusedLayer):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.used(batch[0]) + 0 * self.unused(batch[0]), batch[1])

    def on_train_start(self):
        ddp = self.trainer.model  # Lightning's trainer.model: the DDP wrapper
        self.log("static_graph", float(ddp.static_graph))
        self.log("gradient_as_bucket_view", float(ddp.gradient_as_bucket_view))
        self.log("bucket_cap_mb", ddp.bucket_bytes_cap / 2**20)


class ManualWithWrapperReport(ReportsItsWrapper):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def _fit(module: pl.LightningModule, strategy) -> pl.Trainer:
    trainer = pl.Trainer(
        num_workers=2,
        strategy=strategy,
        max_epochs=1,
        limit_train_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader())
    return trainer


@pytest.mark.slow
def test_unused_parameters_under_plain_ddp_name_the_strategy_that_fixes_it(ray_session):
    with pytest.raises(RuntimeError) as info:
        _fit(WithUnusedLayer(), "ddp")
    message = str(info.value)
    assert "parameters that were not used in producing the loss" in message
    assert "strategy='ddp_find_unused_parameters_true'" in message
    assert "strategy=DDPStrategy(find_unused_parameters=True)" in message
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "raised RuntimeError in training_step (epoch 0, batch 1)" in notes
    # torch's own error is kept as the cause, in the rank's traceback.
    assert "Expected to have finished reduction in the prior iteration" in notes


@pytest.mark.slow
def test_find_unused_parameters_by_name_and_by_object_train_the_same(ray_session):
    by_name, by_object = WithUnusedLayer(), WithUnusedLayer()
    before = {k: v.clone() for k, v in by_name.state_dict().items()}
    _fit(by_name, "ddp_find_unused_parameters_true")
    _fit(by_object, DDPStrategy(find_unused_parameters=True))
    for name, value in by_name.state_dict().items():
        assert torch.equal(value, by_object.state_dict()[name]), name
        assert torch.equal(value, before[name]) == name.startswith("unused."), name


@pytest.mark.slow
@pytest.mark.parametrize("module_cls", [ReportsItsWrapper, ManualWithWrapperReport])
def test_ddp_arguments_reach_the_ranks_wrapper_and_train_as_plain_ddp(ray_session, module_cls):
    plain, tuned = module_cls(), module_cls()
    _fit(plain, "ddp")
    strategy = DDPStrategy(static_graph=True, gradient_as_bucket_view=True, bucket_cap_mb=1)
    trainer = _fit(tuned, strategy)
    reported = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert reported == {"static_graph": 1.0, "gradient_as_bucket_view": 1.0, "bucket_cap_mb": 1.0}
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[name], value, rtol=0, atol=1e-7)
