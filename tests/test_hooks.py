"""The hook dispatcher (``raylight/rank/hooks.py``) on one process, without Ray."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest

import raylight as pl
from raylight.rank import hooks
from raylight.shared.config import MisconfigurationException


class Recording(pl.Callback):
    def __init__(self, name, calls, monitors=False):
        self.name, self.calls = name, calls
        self._monitors_metrics = monitors

    def on_train_epoch_end(self, trainer, pl_module):
        self.calls.append((self.name, trainer._current_hook, pl_module._current_fx_name))

    def on_fit_start(self, trainer, pl_module):
        self.calls.append((self.name, "on_fit_start"))


class Module(pl.LightningModule):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def on_train_epoch_end(self):
        self.calls.append(("module", self.trainer_hook(), self._current_fx_name))
        return "module output"

    def trainer_hook(self):
        return self._fake_trainer._current_hook

    def training_step(self, batch, batch_idx):
        raise ValueError(f"bad batch {batch_idx}")


def _trainer(callbacks, module, datamodule=None):
    trainer = SimpleNamespace(
        lightning_module=module,
        callbacks=callbacks,
        datamodule=datamodule,
        _current_hook=None,
        _hook_targets={},
        _profile=None,  # Trainer(profiler=None)
    )
    object.__setattr__(module, "_fake_trainer", trainer)
    return trainer


def test_with_the_simple_profiler_every_call_is_timed_under_lightnings_names():
    class Module(pl.LightningModule):
        def on_train_start(self):
            pass

        def training_step(self, batch, batch_idx):
            return batch

    class Watcher(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            pass

    module = Module()
    trainer = _trainer([Watcher()], module)
    trainer._profile = {}
    hooks.call(trainer, "on_train_start")
    hooks.call(trainer, "on_train_start")
    assert hooks.call_module(trainer, "training_step", 7, 0) == 7
    hooks.call_callbacks(trainer, "on_sanity_check_start")
    figures = trainer._profile
    assert figures.keys() == {
        "[LightningModule]Module.on_train_start",
        "[Callback]Watcher.on_train_start",
        "[LightningModule]Module.training_step",
        "[Callback]Watcher.on_sanity_check_start",
    }
    assert figures["[Callback]Watcher.on_train_start"][0] == 2
    assert all(seconds >= 0 for _, seconds in figures.values())


def test_callbacks_run_in_order_then_the_module_which_gives_the_result():
    calls = []
    module = Module(calls)
    trainer = _trainer([Recording("a", calls), Recording("b", calls)], module)
    assert hooks.call(trainer, "on_train_epoch_end") == "module output"
    hook = "on_train_epoch_end"
    assert calls == [("a", hook, hook), ("b", hook, hook), ("module", hook, hook)]
    # The hook context is restored afterwards.
    assert trainer._current_hook is None and module._current_fx_name is None


def test_monitoring_callbacks_run_after_the_module_in_their_own_part():
    calls = []
    module = Module(calls)
    monitor, plain = Recording("monitor", calls, monitors=True), Recording("plain", calls)
    trainer = _trainer([monitor, plain], module)
    hooks.call(trainer, "on_train_epoch_end", part="before_monitors")
    assert [c[0] for c in calls] == ["plain", "module"]
    hooks.call(trainer, "on_train_epoch_end", part="monitors")
    assert [c[0] for c in calls] == ["plain", "module", "monitor"]
    calls.clear()
    hooks.call(trainer, "on_train_epoch_end")  # "all": monitors are plain callbacks here
    assert [c[0] for c in calls] == ["monitor", "plain", "module"]


def test_only_overrides_run_and_a_hook_nobody_overrides_is_skipped():
    calls = []
    module = Module(calls)
    trainer = _trainer([Recording("a", calls), pl.Callback()], module)
    assert hooks.call(trainer, "on_validation_start") is None
    assert trainer._hook_targets[("on_validation_start", "all")] == []
    hooks.call(trainer, "on_fit_start")
    assert calls == [("a", "on_fit_start")]


def test_a_hook_set_on_the_instance_runs():
    calls = []
    callback = pl.Callback()
    callback.on_train_start = lambda trainer, module: calls.append("instance hook")
    trainer = _trainer([callback], Module(calls))
    hooks.call(trainer, "on_train_start")
    assert calls == ["instance hook"]


def test_an_error_is_tagged_with_its_innermost_hook_and_the_context_restored():
    module = Module([])
    trainer = _trainer([], module)
    trainer._current_hook = "outer"
    with pytest.raises(ValueError, match="bad batch 3") as raised:
        hooks.call_module(trainer, "training_step", None, 3)
    assert raised.value._raylight_hook == "training_step"
    assert trainer._current_hook == "outer" and module._current_fx_name is None
    hooks.tag_error(raised.value, "on_train_batch_end")  # an outer hook does not overwrite it
    assert raised.value._raylight_hook == "training_step"


def test_datamodule_hooks_are_named_by_their_class():
    class Data(pl.LightningDataModule):
        def setup(self, stage):
            raise RuntimeError(stage)

    trainer = _trainer([], Module([]), Data())
    with pytest.raises(RuntimeError) as raised:
        hooks.call_datamodule(trainer, "setup", "fit")
    assert raised.value._raylight_hook == "Data.setup"
    assert hooks.call_datamodule(_trainer([], Module([])), "setup", "fit") is None


def test_callback_only_hooks_reach_every_callback():
    seen = []

    class Sanity(pl.Callback):
        def on_sanity_check_start(self, trainer, pl_module):
            seen.append(trainer._current_hook)

    trainer = _trainer([Sanity(), Sanity()], Module([]))
    hooks.call_callbacks(trainer, "on_sanity_check_start")
    assert seen == ["on_sanity_check_start"] * 2


# ---- the step hooks take Lightning's optional arguments by their signature ---------------------
def _passes_through(step):
    @functools.wraps(step)
    def wrapper(self, *args):
        return step(self, *args)

    return wrapper


class Steps(pl.LightningModule):
    @_passes_through  # read through the decorator, as Lightning does: no batch_idx
    def training_step(self, batch):
        return ("train", batch)

    def validation_step(self, batch, *args):
        return ("val", batch, args)

    def test_step(self, batch, idx):  # any name: two arguments after self take batch_idx
        return ("test", batch, idx)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return ("predict", batch, batch_idx, dataloader_idx)


def test_steps_get_batch_idx_and_dataloader_idx_as_their_signature_asks():
    trainer = _trainer([], Steps())
    assert hooks.call_module(trainer, "training_step", "b", 5) == ("train", "b")
    assert hooks.call_module(trainer, "validation_step", "b", 5) == ("val", "b", (5,))
    assert hooks.call_module(trainer, "validation_step", "b", 5, 1) == ("val", "b", (5, 1))
    assert hooks.call_module(trainer, "test_step", "b", 5) == ("test", "b", 5)
    assert hooks.call_module(trainer, "predict_step", "b", 5) == ("predict", "b", 5, 0)
    assert hooks.call_module(trainer, "predict_step", "b", 5, 1) == ("predict", "b", 5, 1)
    # A step set on the instance is read for itself, not from the class's cached signature.
    trainer.lightning_module.training_step = lambda batch, batch_idx: ("instance", batch_idx)
    assert hooks.call_module(trainer, "training_step", "b", 5) == ("instance", 5)


_SIGNATURES = {
    "batch": lambda self, batch: (batch,),
    "batch_idx": lambda self, batch, batch_idx: (batch, batch_idx),
    "other_name": lambda self, batch, i: (batch, i),
    "args": lambda self, batch, *args: (batch, *args),
    "keyword_only": lambda self, batch, *, batch_idx=-1: (batch, batch_idx),
    "idx_default": lambda self, batch, batch_idx, dataloader_idx=0: (
        batch,
        batch_idx,
        dataloader_idx,
    ),
    "idx_required": lambda self, batch, batch_idx, dataloader_idx: (
        batch,
        batch_idx,
        dataloader_idx,
    ),
    "idx_only": lambda self, batch, dataloader_idx=0: (batch, dataloader_idx),
}


@pytest.mark.parametrize("name", sorted(_SIGNATURES))
@pytest.mark.parametrize("loaders", [1, 2])
def test_step_arguments_and_errors_match_lightnings_loops(name, loaders):
    pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.loops.utilities import _verify_dataloader_idx_requirement
    from pytorch_lightning.trainer.states import RunningStage
    from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature

    module = type("Stepper", (pl.LightningModule,), {"validation_step": _SIGNATURES[name]})()
    step = module.validation_step
    given = ("b", 5, 1) if loaders == 2 else ("b", 5)
    # Lightning: check dataloader_idx first, then pass batch_idx only where the rule allows.
    try:
        _verify_dataloader_idx_requirement(
            ("validation_step",), loaders > 1, RunningStage.VALIDATING, module
        )
    except RuntimeError as error:
        with pytest.raises(RuntimeError) as ours:
            hooks.call_module(_trainer([], module), "validation_step", *given)
        assert str(ours.value) == str(error)
        return
    wanted = given if is_param_in_hook_signature(step, "batch_idx", min_args=2) else given[::2]
    try:
        expected = step(*wanted)
    except TypeError as error:  # Lightning passes what this signature cannot take
        with pytest.raises(TypeError) as ours:
            hooks.call_module(_trainer([], module), "validation_step", *given)
        assert str(ours.value) == str(error)
        return
    assert hooks.call_module(_trainer([], module), "validation_step", *given) == expected


def test_a_dataloader_iter_step_is_refused_with_the_signature_to_use():
    module = type("Iter", (pl.LightningModule,), {"training_step": lambda self, dataloader_iter: 0})
    with pytest.raises(
        MisconfigurationException, match=r"dataloader_iter.*\(self, batch, batch_idx\)"
    ):
        hooks.call_module(_trainer([], module()), "training_step", "b", 0)
