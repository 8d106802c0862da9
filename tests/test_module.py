"""LightningModule without a Trainer: hyperparameters, pickling, batch transfer, seeding."""

import os
import pickle
import random
from collections import OrderedDict, defaultdict, namedtuple

import numpy as np
import pytest
import torch

import raylight
from raylight.module import AttributeDict, LightningModule, move_data_to_device


class Net(LightningModule):
    def __init__(self, lr, hidden=32, *, dropout=0.1, **kwargs):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(2, hidden)


class IgnoreOne(LightningModule):
    def __init__(self, lr=0.01, backbone=None):
        super().__init__()
        self.save_hyperparameters(ignore="backbone")


class IgnoreMany(LightningModule):
    def __init__(self, lr=0.01, backbone=None, head=None):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "head"])


class OnlyLr(LightningModule):
    def __init__(self, lr=0.01, hidden=32, backbone=None):
        super().__init__()
        self.save_hyperparameters("lr")


class LrAndHidden(LightningModule):
    def __init__(self, lr=0.01, hidden=32, backbone=None):
        super().__init__()
        self.save_hyperparameters("lr", "hidden")


class FromDict(LightningModule):
    def __init__(self, config):
        super().__init__()
        self.save_hyperparameters(config)


class WithVarargs(LightningModule):
    def __init__(self, a, *args, b=2, **kwargs):
        super().__init__()
        self.save_hyperparameters()


class Nested(LightningModule):
    def __init__(self, layers=(1, 2), schedule=None):
        super().__init__()
        self.save_hyperparameters()


# ---- save_hyperparameters --------------------------------------------------------------------------


def test_save_hyperparameters_collects_args_defaults_and_kwargs():
    model = Net(0.01, momentum=0.9, name="net")
    assert isinstance(model.hparams, AttributeDict)
    assert dict(model.hparams) == {
        "lr": 0.01,
        "hidden": 32,
        "dropout": 0.1,
        "momentum": 0.9,
        "name": "net",
    }


def test_save_hyperparameters_sees_passed_values():
    model = Net(lr=0.5, hidden=8, dropout=0.0)
    assert dict(model.hparams) == {"lr": 0.5, "hidden": 8, "dropout": 0.0}
    assert model.layer.out_features == 8


def test_varargs_are_not_hyperparameters():
    # Lightning's save_hyperparameters drops the *args variable and merges **kwargs.
    model = WithVarargs(1, 5, 6, b=3, c=4)
    assert dict(model.hparams) == {"a": 1, "b": 3, "c": 4}


def test_ignore_a_name():
    model = IgnoreOne(lr=0.2, backbone=torch.nn.Linear(1, 1))
    assert dict(model.hparams) == {"lr": 0.2}


def test_ignore_a_list():
    model = IgnoreMany(backbone=1, head=2)
    assert dict(model.hparams) == {"lr": 0.01}


def test_save_named_hyperparameters_only():
    assert dict(OnlyLr(lr=0.3, hidden=7, backbone="x").hparams) == {"lr": 0.3}
    assert dict(LrAndHidden(lr=0.3, hidden=7).hparams) == {"lr": 0.3, "hidden": 7}


def test_save_hyperparameters_from_a_dict():
    config = {"lr": 0.1, "layers": 3}
    model = FromDict(config)
    assert dict(model.hparams) == config
    config["lr"] = 1.0
    assert model.hparams.lr == 0.1  # a copy, not the caller's dict


def test_hparams_attribute_access():
    model = Net(0.01)
    assert model.hparams.lr == 0.01
    assert model.hparams.hidden == 32
    model.hparams.lr = 0.5
    assert model.hparams["lr"] == 0.5
    with pytest.raises(AttributeError, match="missing"):
        model.hparams.missing  # noqa: B018


def test_hparams_initial_is_not_changed_by_updates():
    model = Net(0.01)
    model.hparams.lr = 0.5
    assert model.hparams_initial.lr == 0.01
    assert model.hparams.lr == 0.5


def test_hparams_initial_is_not_changed_by_nested_updates():
    # Lightning keeps a deep copy in hparams_initial.
    model = Nested(layers=[1, 2], schedule={"warmup": 1})
    model.hparams.layers.append(3)
    model.hparams.schedule["warmup"] = 5
    assert model.hparams_initial.layers == [1, 2]
    assert model.hparams_initial.schedule == {"warmup": 1}


def test_no_save_hyperparameters_means_empty_hparams():
    class Plain(LightningModule):
        def __init__(self, lr=0.1):
            super().__init__()

    assert dict(Plain().hparams) == {}


# ---- pickling and the trainer -----------------------------------------------------------------------


def test_module_pickles_without_its_trainer():
    model = Net(0.01, hidden=4)
    trainer = object()
    model.trainer = trainer
    copy = pickle.loads(pickle.dumps(model))
    assert copy._trainer is None
    assert model.trainer is trainer  # the original keeps it
    assert dict(copy.hparams) == dict(model.hparams)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(copy.state_dict()[name], tensor)
    with pytest.raises(RuntimeError, match="not attached to a Trainer"):
        copy.trainer  # noqa: B018


def test_unattached_trainer_access_raises_helpfully():
    model = Net(0.01)
    with pytest.raises(RuntimeError) as info:
        model.trainer  # noqa: B018
    message = str(info.value)
    assert "Net" in message
    assert "not attached to a Trainer" in message


def test_trainer_free_defaults():
    model = Net(0.01)
    assert (model.current_epoch, model.global_step, model.global_rank, model.local_rank) == (
        0,
        0,
        0,
        0,
    )
    assert model.device == torch.device("cpu")
    assert model.automatic_optimization is True


def test_log_outside_a_trainer_is_a_no_op():
    model = Net(0.01)
    # not even validated: a non-scalar and an unknown reduce_fx pass silently
    assert model.log("loss", torch.zeros(3), reduce_fx="median") is None
    assert model.log("loss", 1.0, on_step=True, on_epoch=True, sync_dist=True) is None
    model.log_dict({"a": 1.0, "b": torch.tensor(2.0)})
    assert model._trainer is None


def test_log_delegates_to_the_attached_trainer_with_the_current_hook():
    calls = []

    class FakeTrainer:
        def _log(self, fx, name, value, **kwargs):
            calls.append((fx, name, value, kwargs))

    model = Net(0.01)
    model.trainer = FakeTrainer()
    model._current_fx_name = "training_step"
    model.log("loss", 2.0, prog_bar=True)
    ((fx, name, value, kwargs),) = calls
    assert (fx, name, value) == ("training_step", "loss", 2.0)
    assert kwargs["prog_bar"] is True
    assert kwargs["logger"] is True  # logger=None means True
    assert kwargs["on_step"] is None and kwargs["on_epoch"] is None
    assert kwargs["reduce_fx"] == "mean"


# ---- move_data_to_device --------------------------------------------------------------------------

META = torch.device("meta")
Batch = namedtuple("Batch", ["x", "y"])


def test_move_a_tensor():
    moved = move_data_to_device(torch.ones(2, 3), META)
    assert moved.device.type == "meta"
    assert moved.shape == (2, 3)


def test_move_nested_structures_keeps_types_and_non_tensors():
    batch = {
        "inputs": [torch.ones(2), (torch.zeros(3), "tag")],
        "meta": {"ids": torch.arange(4), "n": 4},
        "name": "batch",
    }
    moved = move_data_to_device(batch, META)
    assert type(moved) is dict
    assert type(moved["inputs"]) is list
    assert type(moved["inputs"][1]) is tuple
    assert moved["inputs"][0].device.type == "meta"
    assert moved["inputs"][1][0].device.type == "meta"
    assert moved["inputs"][1][1] == "tag"
    assert moved["meta"]["ids"].device.type == "meta"
    assert moved["meta"]["ids"].dtype == torch.int64
    assert moved["meta"]["n"] == 4
    assert moved["name"] == "batch"
    assert batch["inputs"][0].device.type == "cpu"  # the input is not changed


def test_move_namedtuple():
    moved = move_data_to_device(Batch(x=torch.ones(2), y=[torch.zeros(1)]), META)
    assert type(moved) is Batch
    assert moved.x.device.type == "meta"
    assert moved.y[0].device.type == "meta"


def test_move_ordered_dict_keeps_order():
    batch = OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))])
    moved = move_data_to_device(batch, META)
    assert type(moved) is OrderedDict
    assert list(moved) == ["b", "a"]
    assert moved["a"].device.type == "meta"


def test_move_defaultdict():
    # Lightning's apply_to_collection rebuilds a defaultdict with its default_factory.
    batch = defaultdict(list, {"x": torch.ones(2)})
    moved = move_data_to_device(batch, META)
    assert type(moved) is defaultdict
    assert moved.default_factory is list
    assert moved["x"].device.type == "meta"


def test_transfer_batch_to_device_hook_moves_the_batch():
    model = Net(0.01)
    moved = model.transfer_batch_to_device((torch.ones(1), torch.zeros(1)), META, 0)
    assert all(t.device.type == "meta" for t in moved)


# ---- seed_everything --------------------------------------------------------------------------------


@pytest.fixture
def clean_seed_state(monkeypatch):
    # setenv records the original value (or its absence) for teardown; seed_everything
    # writes os.environ directly, so both variables are restored after the test.
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    torch_state = torch.get_rng_state()
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    yield
    torch.set_rng_state(torch_state)
    random.setstate(python_state)
    np.random.set_state(numpy_state)


@pytest.mark.usefixtures("clean_seed_state")
def test_seed_everything_sets_env_and_makes_generators_reproducible():
    assert raylight.seed_everything(7) == 7
    assert os.environ["PL_GLOBAL_SEED"] == "7"
    assert os.environ["PL_SEED_WORKERS"] == "0"
    first = (torch.rand(5), random.random(), np.random.rand(3))

    raylight.seed_everything(7)
    second = (torch.rand(5), random.random(), np.random.rand(3))
    torch.testing.assert_close(first[0], second[0])
    assert first[1] == second[1]
    np.testing.assert_array_equal(first[2], second[2])

    raylight.seed_everything(8)
    assert not torch.equal(torch.rand(5), first[0])


@pytest.mark.usefixtures("clean_seed_state")
def test_seed_everything_without_a_seed_reads_the_environment():
    os.environ["PL_GLOBAL_SEED"] = "11"
    assert raylight.seed_everything() == 11
    expected = torch.rand(3)
    torch.manual_seed(11)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.usefixtures("clean_seed_state")
def test_seed_everything_workers_flag():
    raylight.seed_everything(3, workers=True)
    assert os.environ["PL_SEED_WORKERS"] == "1"


class _RankView:
    def __init__(self, rank: int) -> None:
        self.global_rank = rank


def test_print_only_on_global_rank_zero(capsys):
    module = LightningModule()
    module.trainer = _RankView(1)
    module.print("from rank one")
    module.trainer = _RankView(0)
    module.print("from rank zero")
    assert capsys.readouterr().out == "from rank zero\n"


def test_freeze_and_unfreeze_match_lightning():
    lightning = pytest.importorskip("pytorch_lightning")

    def build(base):
        class Net(base):
            def __init__(self):
                super().__init__()
                self.body = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5))

        return Net()

    ours, theirs = build(LightningModule), build(lightning.LightningModule)
    for model in (ours, theirs):
        model.freeze()
    assert [p.requires_grad for p in ours.parameters()] == [False, False]
    assert [p.requires_grad for p in theirs.parameters()] == [False, False]
    assert [m.training for m in ours.modules()] == [m.training for m in theirs.modules()]
    assert not any(m.training for m in ours.modules())
    for model in (ours, theirs):
        model.unfreeze()
    assert all(p.requires_grad for p in ours.parameters())
    assert [m.training for m in ours.modules()] == [m.training for m in theirs.modules()]
    assert all(m.training for m in ours.modules())


def test_the_core_namespace_names_the_same_classes():
    import raylight.core
    import raylight.core.datamodule
    import raylight.core.module

    assert raylight.core.LightningModule is raylight.core.module.LightningModule is LightningModule
    assert raylight.core.LightningDataModule is raylight.core.datamodule.LightningDataModule
    assert raylight.core.LightningDataModule is raylight.LightningDataModule
