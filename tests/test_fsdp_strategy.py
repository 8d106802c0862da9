"""``FSDPStrategy``'s arguments, checked on the driver before any worker starts (no Ray)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, size_based_auto_wrap_policy

import raylight as pl
from raylight.shared.config import MisconfigurationException
from raylight.strategies import FSDPStrategy


def test_strategy_names_and_the_class_set_the_runs_fsdp_settings():
    assert pl.Trainer(strategy="fsdp").config.fsdp == {
        "auto_wrap_policy": None,
        "activation_checkpointing_policy": None,
        "cpu_offload": False,
        "sharding_strategy": "FULL_SHARD",
        "state_dict_type": "sharded",
    }
    assert pl.Trainer(strategy="ddp").config.fsdp is None
    strategy = FSDPStrategy(
        auto_wrap_policy={torch.nn.Linear, torch.nn.Conv2d},
        activation_checkpointing_policy=[torch.nn.Linear],
        sharding_strategy="SHARD_GRAD_OP",
        state_dict_type="full",
    )
    settings = pl.Trainer(strategy=strategy).config.fsdp
    # A set becomes a tuple in a fixed order, so that every rank wraps the same units.
    assert settings["auto_wrap_policy"] == (torch.nn.Conv2d, torch.nn.Linear)
    assert settings["activation_checkpointing_policy"] == (torch.nn.Linear,)
    assert settings["sharding_strategy"] == "SHARD_GRAD_OP"
    assert settings["state_dict_type"] == "full"


def test_torchs_module_wrap_policy_and_lightnings_callables_are_taken():
    assert FSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear})).auto_wrap_policy == (
        torch.nn.Linear,
    )
    policy = functools.partial(size_based_auto_wrap_policy, min_num_params=10)
    assert FSDPStrategy(auto_wrap_policy=policy).auto_wrap_policy is policy
    hybrid = FSDPStrategy(sharding_strategy=ShardingStrategy.HYBRID_SHARD)
    assert hybrid.sharding_strategy == "HYBRID_SHARD"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sharding_strategy": "ZERO3"}, "use one of"),
        ({"state_dict_type": "local"}, "use 'sharded' or 'full'"),
        ({"auto_wrap_policy": {"Linear"}}, "it takes nn.Module classes"),
        ({"activation_checkpointing_policy": len}, "it takes a set of classes"),
        ({"mixed_precision": object()}, "Trainer\\(precision="),
        ({"device_mesh": (2, 2)}, "builds the mesh"),
        ({"limit_all_gathers": True}, "not an argument raylight's FSDPStrategy takes"),
        ({"timeout": 30}, "datetime.timedelta"),
    ],
)
def test_bad_arguments_name_the_fix(arguments, message):
    with pytest.raises(MisconfigurationException, match=message):
        FSDPStrategy(**arguments)


def test_cpu_offload_needs_gpu_workers():
    with pytest.raises(MisconfigurationException, match="needs GPU workers"):
        pl.Trainer(strategy="fsdp_cpu_offload")
    with pytest.raises(MisconfigurationException, match="needs GPU workers"):
        pl.Trainer(strategy=FSDPStrategy(cpu_offload=True), use_gpu=False)


@pytest.mark.parametrize("budget", [-1, "8", True])
def test_the_drivers_weight_budget_must_be_a_size(budget):
    with pytest.raises(MisconfigurationException, match="max_driver_weights_gb"):
        pl.Trainer(strategy="fsdp", max_driver_weights_gb=budget)
    assert pl.Trainer(max_driver_weights_gb=0.5).config.max_driver_weights_bytes == 2**29


def test_unknown_strategy_names_list_fsdp():
    with pytest.raises(MisconfigurationException, match="'fsdp'"):
        pl.Trainer(strategy="deepspeed")


def test_a_numbered_optimizer_state_is_named_by_parameter_for_fsdp():
    from raylight.rank.fsdp import _keyed_by_name

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.Adam(module.parameters())
    module(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    named = _keyed_by_name(module, optimizer, optimizer.state_dict())
    assert named["param_groups"][0]["params"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert torch.equal(
        named["state"]["1.bias"]["exp_avg"], optimizer.state[module[1].bias]["exp_avg"]
    )
    assert _keyed_by_name(module, optimizer, named) is named  # already named: as it is

    smaller = torch.optim.Adam(module[0].parameters())
    with pytest.raises(ValueError, match=r"holds 4 parameters in groups of \[4\]; this run's "):
        _keyed_by_name(module, smaller, optimizer.state_dict())
    # The same parameters grouped otherwise: the groups' settings would land on others.
    regrouped = torch.optim.Adam(
        [{"params": [module[0].weight]}, {"params": [module[0].bias, *module[1].parameters()]}]
    )
    with pytest.raises(ValueError, match=r"has 4 in groups of \[1, 3\]"):
        _keyed_by_name(module, regrouped, optimizer.state_dict())
