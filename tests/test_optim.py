"""``parse_optimizers`` for every ``configure_optimizers`` return form, and ``LightningOptimizer``."""

import pytest
import torch

from raylight.rank.optim import LightningOptimizer, LRSchedulerConfig, parse_optimizers
from raylight.shared.config import MisconfigurationException


def make_optimizer(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.fixture
def opt():
    return make_optimizer()


@pytest.fixture
def opt2():
    return make_optimizer(lr=0.5)


def step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)


# ---- the return forms -----------------------------------------------------------------------------


def test_none_means_no_optimizers():
    assert parse_optimizers(None) == ([], [])


def test_single_optimizer(opt):
    optimizers, schedulers = parse_optimizers(opt)
    assert optimizers == [opt]
    assert schedulers == []


def test_list_of_optimizers(opt, opt2):
    optimizers, schedulers = parse_optimizers([opt, opt2])
    assert optimizers == [opt, opt2]
    assert schedulers == []


def test_tuple_of_optimizers(opt, opt2):
    optimizers, schedulers = parse_optimizers((opt, opt2))
    assert optimizers == [opt, opt2]
    assert schedulers == []


def test_two_lists(opt, opt2):
    s1, s2 = step_lr(opt), step_lr(opt2)
    optimizers, schedulers = parse_optimizers(([opt, opt2], [s1, s2]))
    assert optimizers == [opt, opt2]
    assert [config.scheduler for config in schedulers] == [s1, s2]
    for config in schedulers:
        assert isinstance(config, LRSchedulerConfig)
        assert (config.interval, config.frequency, config.monitor, config.strict) == (
            "epoch",
            1,
            None,
            True,
        )
        assert config.reduce_on_plateau is False


def test_two_lists_with_a_scheduler_config(opt):
    sched = step_lr(opt)
    optimizers, schedulers = parse_optimizers(([opt], [{"scheduler": sched, "interval": "step"}]))
    assert optimizers == [opt]
    assert schedulers[0].scheduler is sched
    assert schedulers[0].interval == "step"


def test_two_lists_without_schedulers(opt):
    assert parse_optimizers(([opt], [])) == ([opt], [])


def test_list_of_optimizers_with_a_single_scheduler(opt):
    # Lightning: `return [opt], sched` -- the second item may be a lone scheduler.
    sched = step_lr(opt)
    optimizers, schedulers = parse_optimizers(([opt], sched))
    assert optimizers == [opt]
    assert [config.scheduler for config in schedulers] == [sched]


def test_list_of_optimizers_with_a_single_scheduler_config(opt):
    # Lightning: `return [opt], {"scheduler": sched, "interval": "step"}`.
    sched = step_lr(opt)
    optimizers, schedulers = parse_optimizers(([opt], {"scheduler": sched, "interval": "step"}))
    assert optimizers == [opt]
    assert len(schedulers) == 1
    assert schedulers[0].scheduler is sched
    assert schedulers[0].interval == "step"


def test_dict_with_optimizer_only(opt):
    assert parse_optimizers({"optimizer": opt}) == ([opt], [])


def test_dict_with_scheduler_object(opt):
    sched = step_lr(opt)
    optimizers, schedulers = parse_optimizers({"optimizer": opt, "lr_scheduler": sched})
    assert optimizers == [opt]
    assert len(schedulers) == 1
    assert schedulers[0].scheduler is sched
    assert schedulers[0].interval == "epoch"
    assert schedulers[0].frequency == 1


def test_dict_with_scheduler_config(opt):
    sched = step_lr(opt)
    optimizers, schedulers = parse_optimizers(
        {
            "optimizer": opt,
            "lr_scheduler": {
                "scheduler": sched,
                "interval": "step",
                "frequency": 3,
                "monitor": "val_loss",
                "strict": False,
                "name": "my_lr",
            },
        }
    )
    assert optimizers == [opt]
    (config,) = schedulers
    assert config.scheduler is sched
    assert config.interval == "step"
    assert config.frequency == 3
    assert config.monitor == "val_loss"
    assert config.strict is False
    assert config.name == "my_lr"
    assert config.reduce_on_plateau is False


def test_dict_with_none_scheduler(opt):
    assert parse_optimizers({"optimizer": opt, "lr_scheduler": None}) == ([opt], [])


def test_list_of_dicts(opt, opt2):
    sched = step_lr(opt)
    optimizers, schedulers = parse_optimizers(
        [
            {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}},
            {"optimizer": opt2},
        ]
    )
    assert optimizers == [opt, opt2]
    assert [config.scheduler for config in schedulers] == [sched]
    assert schedulers[0].interval == "step"


def test_tuple_of_dicts(opt, opt2):
    optimizers, schedulers = parse_optimizers(({"optimizer": opt}, {"optimizer": opt2}))
    assert optimizers == [opt, opt2]
    assert schedulers == []


# ---- ReduceLROnPlateau ------------------------------------------------------------------------------


def test_plateau_without_monitor_raises(opt):
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    with pytest.raises(MisconfigurationException, match="monitor"):
        parse_optimizers({"optimizer": opt, "lr_scheduler": plateau})
    with pytest.raises(MisconfigurationException, match="monitor"):
        parse_optimizers({"optimizer": opt, "lr_scheduler": {"scheduler": plateau}})
    with pytest.raises(MisconfigurationException, match="monitor"):
        parse_optimizers(([opt], [plateau]))


def test_plateau_config_with_monitor(opt):
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    _, schedulers = parse_optimizers(
        {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val_loss"}}
    )
    (config,) = schedulers
    assert config.reduce_on_plateau is True
    assert config.monitor == "val_loss"


def test_plateau_with_top_level_monitor(opt):
    # Lightning's documented form:
    # {"optimizer": opt, "lr_scheduler": ReduceLROnPlateau(opt), "monitor": "val_loss"}
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    optimizers, schedulers = parse_optimizers(
        {"optimizer": opt, "lr_scheduler": plateau, "monitor": "val_loss"}
    )
    assert optimizers == [opt]
    (config,) = schedulers
    assert config.scheduler is plateau
    assert config.reduce_on_plateau is True
    assert config.monitor == "val_loss"


# ---- bad returns --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output",
    ["adam", 3, 0.1, object(), [object()], ["adam", "sgd"]],
    ids=["str", "int", "float", "object", "list_of_object", "list_of_str"],
)
def test_bad_return_says_what_is_expected(output):
    with pytest.raises(MisconfigurationException) as info:
        parse_optimizers(output)
    message = str(info.value)
    assert "expected" in message
    assert "optimizer" in message
    assert "lr_scheduler" in message


def test_mixed_list_raises(opt):
    with pytest.raises(MisconfigurationException, match="expected"):
        parse_optimizers([opt, "sgd"])


def test_two_lists_with_a_non_optimizer_raise(opt):
    with pytest.raises(MisconfigurationException, match="expected"):
        parse_optimizers((["sgd"], []))


def test_dict_without_optimizer_raises(opt):
    with pytest.raises(MisconfigurationException, match="'optimizer'"):
        parse_optimizers({"lr_scheduler": step_lr(opt)})
    with pytest.raises(MisconfigurationException, match="'optimizer'"):
        parse_optimizers({"optimizer": "sgd"})
    with pytest.raises(MisconfigurationException, match="'optimizer'"):
        parse_optimizers([{"optimizer": opt}, {"opt": opt}])


def test_scheduler_config_with_unknown_key_raises(opt):
    config = {"scheduler": step_lr(opt), "intervall": "step"}
    with pytest.raises(MisconfigurationException) as info:
        parse_optimizers({"optimizer": opt, "lr_scheduler": config})
    message = str(info.value)
    assert "intervall" in message  # names what is wrong
    assert "'interval'" in message  # and what is allowed


def test_scheduler_config_without_scheduler_raises(opt):
    with pytest.raises(MisconfigurationException, match="'scheduler'"):
        parse_optimizers({"optimizer": opt, "lr_scheduler": {"interval": "step"}})


def test_scheduler_interval_batch_raises(opt):
    config = {"scheduler": step_lr(opt), "interval": "batch"}
    with pytest.raises(MisconfigurationException) as info:
        parse_optimizers({"optimizer": opt, "lr_scheduler": config})
    message = str(info.value)
    assert "'batch'" in message
    assert "'epoch'" in message and "'step'" in message


# ---- LightningOptimizer -----------------------------------------------------------------------------


class RecordingSGD(torch.optim.SGD):
    def __init__(self, params, calls, **kwargs):
        super().__init__(params, **kwargs)
        self.calls = calls

    def step(self, closure=None):
        loss = super().step(closure)
        self.calls.append("optimizer.step")
        return loss


def make_wrapped(calls):
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = RecordingSGD([param], calls, lr=0.5)
    seen = {}

    def after_closure(wrapper):
        seen["after_closure_arg"] = wrapper
        seen["grad_at_after_closure"] = param.grad.clone() if param.grad is not None else None
        calls.append("after_closure")

    def run_step(opt, closure, **kwargs):
        seen["run_step_kwargs"] = kwargs
        calls.append("run_step")
        return opt.step(closure=closure)

    def on_stepped():
        calls.append("on_stepped")

    wrapper = LightningOptimizer(optimizer, after_closure, run_step, on_stepped)
    return wrapper, param, seen


def test_step_runs_closure_hooks_and_step_in_lightning_order():
    calls = []
    wrapper, param, seen = make_wrapped(calls)

    def closure():
        calls.append("closure")
        loss = (param**2).sum()
        loss.backward()
        return loss

    output = wrapper.step(closure)
    assert calls == ["run_step", "closure", "after_closure", "optimizer.step", "on_stepped"]
    assert float(output.detach()) == pytest.approx(5.0)  # the closure's loss comes back
    assert seen["after_closure_arg"] is wrapper
    # after_closure sees the gradients of the closure's backward, before the step
    torch.testing.assert_close(seen["grad_at_after_closure"], torch.tensor([2.0, 4.0]))
    # the step itself happened: p - lr * grad
    torch.testing.assert_close(param.detach(), torch.tensor([0.0, 0.0]))


def test_step_without_closure_still_runs_hooks():
    calls = []
    wrapper, param, _ = make_wrapped(calls)
    param.grad = torch.tensor([2.0, 2.0])
    assert wrapper.step() is None
    assert calls == ["run_step", "after_closure", "optimizer.step", "on_stepped"]
    torch.testing.assert_close(param.detach(), torch.tensor([0.0, 1.0]))


def test_step_forwards_kwargs_to_run_step():
    calls = []
    wrapper, _, seen = make_wrapped(calls)
    wrapper.step(lambda: None, foo=1)
    assert seen["run_step_kwargs"] == {"foo": 1}


def test_wrapper_delegates_to_the_optimizer():
    calls = []
    wrapper, param, _ = make_wrapped(calls)
    assert wrapper.param_groups is wrapper.optimizer.param_groups
    assert wrapper.param_groups[0]["lr"] == 0.5
    assert wrapper.defaults["lr"] == 0.5  # through __getattr__
    param.grad = torch.ones(2)
    wrapper.zero_grad()
    assert param.grad is None
    param.grad = torch.ones(2)
    wrapper.zero_grad(set_to_none=False)
    torch.testing.assert_close(param.grad, torch.zeros(2))
    state = wrapper.state_dict()
    assert state["param_groups"][0]["lr"] == 0.5
    state["param_groups"][0]["lr"] = 0.01
    wrapper.load_state_dict(state)
    assert wrapper.optimizer.param_groups[0]["lr"] == 0.01
