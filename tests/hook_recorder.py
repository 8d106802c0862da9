"""Hook-call recorder shared by the Lightning reference recorder and ``test_hook_order.py``.

This is a plain helper module (not a test file).  ``make_recording_classes(pl)`` builds a
LightningModule, a LightningDataModule and a Callback on top of either the real
``pytorch_lightning`` package or ``raylight`` (both expose the same four names), whose hooks
append one line ``<hookname>`` to ``f"{path}.rank{global_rank}"`` *when the hook is entered*
(call order, not return order: Lightning's own ``tests_pytorch/models/test_hooks.py`` appends on
return, so e.g. ``optimizer_step`` shows up before ``training_step`` here and after it there).

Prefixes: callback hooks are recorded as ``Callback.<hook>``, datamodule hooks as
``DataModule.<hook>``, LightningModule hooks unprefixed.

The module hooks are the set Lightning's own hook test records (every public method of
``LightningModule`` minus ``optimizers``/``log``/``log_dict`` and minus ``nn.Module`` methods other
than ``forward``/``zero_grad``/``train``), restricted to those a Trainer can call in an
automatic-optimization run: utilities such as ``freeze``, ``print``, ``to_onnx``, ``all_gather``,
``toggle_optimizer``, ``manual_backward``, and the deprecated ``configure_sharded_model`` (which
must not be overridden together with ``configure_model``) are left out.

The classes are created inside the factory so that cloudpickle serialises them *by value*: in
raylight the hooks run in Ray worker processes, which need not be able to import this file.
For the same reason the classes only use closures defined in the factory, never module-level
helpers of this file.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

#: The four Trainer entry points whose hook order is recorded.
STAGES = ("fit", "validate", "test", "predict")

#: Where the data comes from: a LightningDataModule (the reference), DataLoaders passed directly to
#: the Trainer method, or the LightningModule's own ``*_dataloader`` hooks.
DATA_SOURCES = ("datamodule", "dataloaders", "module")

NUM_SAMPLES = 8
BATCH_SIZE = 2
IN_FEATURES = 4
OUT_FEATURES = 2

#: Trainer flags shared by the Lightning reference run and the raylight run.
LIMIT_KWARGS: dict[str, Any] = dict(
    max_epochs=1,
    limit_train_batches=2,
    limit_val_batches=1,
    limit_test_batches=1,
    limit_predict_batches=1,
)
COMMON_TRAINER_KWARGS: dict[str, Any] = dict(
    LIMIT_KWARGS,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
)
#: Extra flags for the single-process real-Lightning reference run.
LIGHTNING_TRAINER_KWARGS: dict[str, Any] = dict(
    COMMON_TRAINER_KWARGS,
    accelerator="cpu",
    devices=1,
    enable_model_summary=False,
)

#: Hooks Lightning calls only on LOCAL_RANK 0 of each node (``prepare_data_per_node=True``).
RANK_ZERO_ONLY_HOOKS = ("prepare_data", "DataModule.prepare_data")


def make_dataset():
    """8 deterministic samples of a Linear(4, 2) regression problem."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, IN_FEATURES, generator=g)
    y = torch.randn(NUM_SAMPLES, OUT_FEATURES, generator=g)
    return TensorDataset(x, y)


def make_dataloader():
    from torch.utils.data import DataLoader

    return DataLoader(make_dataset(), batch_size=BATCH_SIZE, shuffle=False)


def rank_file(path, rank: int) -> str:
    return f"{path}.rank{rank}"


def read_records(path) -> dict[int, list[str]]:
    """{global_rank: [hook, ...]} for every ``f"{path}.rank<N>"`` file that exists."""
    out: dict[int, list[str]] = {}
    for fname in glob.glob(glob.escape(str(path)) + ".rank*"):
        m = re.fullmatch(r".*\.rank(\d+)", fname)
        if m is None:
            continue
        with open(fname) as f:
            out[int(m.group(1))] = [line.strip() for line in f if line.strip()]
    return dict(sorted(out.items()))


def expected_for_rank(reference: list[str], rank: int) -> list[str]:
    """What real Lightning records on ``rank`` of a one-node multi-process run.

    Identical to the single-process reference except that ``prepare_data`` (module and
    datamodule) runs on local rank 0 only (checked against pytorch_lightning 2.6.6 with
    ``strategy="ddp_spawn", devices=2`` on CPU).
    """
    if rank == 0:
        return list(reference)
    return [h for h in reference if h not in RANK_ZERO_ONLY_HOOKS]


def stage_kwargs(stage: str, source: str, datamodule=None) -> dict[str, Any]:
    """Keyword arguments for ``trainer.<stage>(model, **kwargs)`` for a data source."""
    if source == "datamodule":
        return {"datamodule": datamodule}
    if source == "module":
        return {}
    if source == "dataloaders":
        if stage == "fit":
            return {"train_dataloaders": make_dataloader(), "val_dataloaders": make_dataloader()}
        return {"dataloaders": make_dataloader()}
    raise ValueError(f"unknown data source {source!r}")


def run_stage(pl_module, trainer, stage: str, source: str, path) -> None:
    """Run ``trainer.<stage>`` on fresh recording objects writing to ``path``.

    The RecordingCallback must already be in ``trainer``'s callbacks (built with the same path).
    """
    RecordingModule, RecordingDataModule, _ = make_recording_classes(pl_module)
    model = RecordingModule(path)
    dm = RecordingDataModule(path) if source == "datamodule" else None
    getattr(trainer, stage)(model, **stage_kwargs(stage, source, dm))


def record_lightning(stage: str, source: str, workdir) -> list[str]:
    """Run real ``pytorch_lightning`` (single CPU process) and return the recorded hook order."""
    import pytorch_lightning as pl

    path = os.path.join(str(workdir), f"lightning_{source}_{stage}")
    for fname in glob.glob(glob.escape(path) + ".rank*"):
        os.remove(fname)
    _, _, RecordingCallback = make_recording_classes(pl)
    trainer = pl.Trainer(callbacks=[RecordingCallback(path)], **LIGHTNING_TRAINER_KWARGS)
    run_stage(pl, trainer, stage, source, path)
    records = read_records(path)
    assert list(records) == [0], f"expected records for rank 0 only, got ranks {list(records)}"
    return records[0]


def make_recording_classes(pl_module):  # noqa: C901 (counts every nested hook method)
    """Return ``(RecordingModule, RecordingDataModule, RecordingCallback)`` built on ``pl_module``.

    ``pl_module`` is the ``pytorch_lightning`` or the ``raylight`` package.  Each class takes the
    record path as its only constructor argument.
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    n_samples, batch_size, n_in, n_out = NUM_SAMPLES, BATCH_SIZE, IN_FEATURES, OUT_FEATURES

    def _rank(trainer) -> int:
        if trainer is not None:
            try:
                return int(trainer.global_rank)
            except Exception:
                pass
        return int(os.environ.get("RANK", "0"))

    def _append(path: str, trainer, name: str) -> None:
        with open(f"{path}.rank{_rank(trainer)}", "a") as f:
            f.write(name + "\n")

    def _loader() -> DataLoader:
        # duplicated from make_dataloader() on purpose: see the module docstring
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n_samples, n_in, generator=g)
        y = torch.randn(n_samples, n_out, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)

    class RecordingModule(pl_module.LightningModule):
        def __init__(self, path):
            super().__init__()
            self.record_path = str(path)
            self.layer = nn.Linear(n_in, n_out)

        def _record(self, name: str) -> None:
            try:
                trainer = self.trainer
            except Exception:  # not attached to a Trainer yet
                trainer = None
            _append(self.record_path, trainer, name)

        # ---- nn.Module methods Lightning's hook test also records
        def forward(self, x):
            self._record("forward")
            return self.layer(x)

        def train(self, mode: bool = True):
            self._record("train")
            return super().train(mode)

        def zero_grad(self, set_to_none: bool = True):
            self._record("zero_grad")
            return super().zero_grad(set_to_none)

        # ---- setup / teardown / configuration
        def prepare_data(self):
            self._record("prepare_data")
            return super().prepare_data()

        def setup(self, stage):
            self._record("setup")
            return super().setup(stage)

        def teardown(self, stage):
            self._record("teardown")
            return super().teardown(stage)

        def configure_callbacks(self):
            self._record("configure_callbacks")
            return super().configure_callbacks()

        def configure_model(self):
            self._record("configure_model")
            return super().configure_model()

        def configure_optimizers(self):
            # the base implementation only warns; a real optimizer is needed
            self._record("configure_optimizers")
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

        # ---- steps (the base implementations only warn)
        def training_step(self, batch, batch_idx):
            self._record("training_step")
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch, batch_idx):
            self._record("validation_step")
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("val_loss", loss)
            return loss

        def test_step(self, batch, batch_idx):
            self._record("test_step")
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("test_loss", loss)
            return loss

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            self._record("predict_step")
            x, _ = batch
            return self(x)

        # ---- dataloaders (the base implementations raise, so these return real loaders)
        def train_dataloader(self):
            self._record("train_dataloader")
            return _loader()

        def val_dataloader(self):
            self._record("val_dataloader")
            return _loader()

        def test_dataloader(self):
            self._record("test_dataloader")
            return _loader()

        def predict_dataloader(self):
            self._record("predict_dataloader")
            return _loader()

        # ---- batch transfer
        def on_before_batch_transfer(self, batch, dataloader_idx):
            self._record("on_before_batch_transfer")
            return super().on_before_batch_transfer(batch, dataloader_idx)

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            self._record("transfer_batch_to_device")
            return super().transfer_batch_to_device(batch, device, dataloader_idx)

        def on_after_batch_transfer(self, batch, dataloader_idx):
            self._record("on_after_batch_transfer")
            return super().on_after_batch_transfer(batch, dataloader_idx)

        # ---- optimization
        def backward(self, loss, *args, **kwargs):
            self._record("backward")
            return super().backward(loss, *args, **kwargs)

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            self._record("optimizer_step")
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            self._record("optimizer_zero_grad")
            return super().optimizer_zero_grad(epoch, batch_idx, optimizer)

        def configure_gradient_clipping(
            self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
        ):
            self._record("configure_gradient_clipping")
            return super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )

        def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self._record("clip_gradients")
            return super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

        def lr_scheduler_step(self, scheduler, metric):
            self._record("lr_scheduler_step")
            return super().lr_scheduler_step(scheduler, metric)

        def on_before_zero_grad(self, optimizer):
            self._record("on_before_zero_grad")
            return super().on_before_zero_grad(optimizer)

        def on_before_backward(self, loss):
            self._record("on_before_backward")
            return super().on_before_backward(loss)

        def on_after_backward(self):
            self._record("on_after_backward")
            return super().on_after_backward()

        def on_before_optimizer_step(self, optimizer):
            self._record("on_before_optimizer_step")
            return super().on_before_optimizer_step(optimizer)

        # ---- checkpointing
        def on_save_checkpoint(self, checkpoint):
            self._record("on_save_checkpoint")
            return super().on_save_checkpoint(checkpoint)

        def on_load_checkpoint(self, checkpoint):
            self._record("on_load_checkpoint")
            return super().on_load_checkpoint(checkpoint)

        # ---- fit
        def on_fit_start(self):
            self._record("on_fit_start")
            return super().on_fit_start()

        def on_fit_end(self):
            self._record("on_fit_end")
            return super().on_fit_end()

        # ---- train loop
        def on_train_start(self):
            self._record("on_train_start")
            return super().on_train_start()

        def on_train_end(self):
            self._record("on_train_end")
            return super().on_train_end()

        def on_train_epoch_start(self):
            self._record("on_train_epoch_start")
            return super().on_train_epoch_start()

        def on_train_epoch_end(self):
            self._record("on_train_epoch_end")
            return super().on_train_epoch_end()

        def on_train_batch_start(self, batch, batch_idx):
            self._record("on_train_batch_start")
            return super().on_train_batch_start(batch, batch_idx)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self._record("on_train_batch_end")
            return super().on_train_batch_end(outputs, batch, batch_idx)

        # ---- validation loop
        def on_validation_start(self):
            self._record("on_validation_start")
            return super().on_validation_start()

        def on_validation_end(self):
            self._record("on_validation_end")
            return super().on_validation_end()

        def on_validation_epoch_start(self):
            self._record("on_validation_epoch_start")
            return super().on_validation_epoch_start()

        def on_validation_epoch_end(self):
            self._record("on_validation_epoch_end")
            return super().on_validation_epoch_end()

        def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0):
            self._record("on_validation_batch_start")
            return super().on_validation_batch_start(batch, batch_idx, dataloader_idx)

        def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
            self._record("on_validation_batch_end")
            return super().on_validation_batch_end(outputs, batch, batch_idx, dataloader_idx)

        def on_validation_model_zero_grad(self):
            self._record("on_validation_model_zero_grad")
            return super().on_validation_model_zero_grad()

        def on_validation_model_eval(self):
            self._record("on_validation_model_eval")
            return super().on_validation_model_eval()

        def on_validation_model_train(self):
            self._record("on_validation_model_train")
            return super().on_validation_model_train()

        # ---- test loop
        def on_test_start(self):
            self._record("on_test_start")
            return super().on_test_start()

        def on_test_end(self):
            self._record("on_test_end")
            return super().on_test_end()

        def on_test_epoch_start(self):
            self._record("on_test_epoch_start")
            return super().on_test_epoch_start()

        def on_test_epoch_end(self):
            self._record("on_test_epoch_end")
            return super().on_test_epoch_end()

        def on_test_batch_start(self, batch, batch_idx, dataloader_idx=0):
            self._record("on_test_batch_start")
            return super().on_test_batch_start(batch, batch_idx, dataloader_idx)

        def on_test_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
            self._record("on_test_batch_end")
            return super().on_test_batch_end(outputs, batch, batch_idx, dataloader_idx)

        def on_test_model_eval(self):
            self._record("on_test_model_eval")
            return super().on_test_model_eval()

        def on_test_model_train(self):
            self._record("on_test_model_train")
            return super().on_test_model_train()

        # ---- predict loop
        def on_predict_start(self):
            self._record("on_predict_start")
            return super().on_predict_start()

        def on_predict_end(self):
            self._record("on_predict_end")
            return super().on_predict_end()

        def on_predict_epoch_start(self):
            self._record("on_predict_epoch_start")
            return super().on_predict_epoch_start()

        def on_predict_epoch_end(self):
            self._record("on_predict_epoch_end")
            return super().on_predict_epoch_end()

        def on_predict_batch_start(self, batch, batch_idx, dataloader_idx=0):
            self._record("on_predict_batch_start")
            return super().on_predict_batch_start(batch, batch_idx, dataloader_idx)

        def on_predict_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
            self._record("on_predict_batch_end")
            return super().on_predict_batch_end(outputs, batch, batch_idx, dataloader_idx)

        def on_predict_model_eval(self):
            self._record("on_predict_model_eval")
            return super().on_predict_model_eval()

    class RecordingDataModule(pl_module.LightningDataModule):
        # The batch-transfer hooks are deliberately NOT overridden here: when a datamodule
        # overrides them, Lightning calls the datamodule's instead of the module's.
        def __init__(self, path):
            super().__init__()
            self.record_path = str(path)

        def _record(self, name: str) -> None:
            _append(self.record_path, getattr(self, "trainer", None), "DataModule." + name)

        def prepare_data(self):
            self._record("prepare_data")
            return super().prepare_data()

        def setup(self, stage):
            self._record("setup")
            return super().setup(stage)

        def teardown(self, stage):
            self._record("teardown")
            return super().teardown(stage)

        def train_dataloader(self):
            self._record("train_dataloader")
            return _loader()

        def val_dataloader(self):
            self._record("val_dataloader")
            return _loader()

        def test_dataloader(self):
            self._record("test_dataloader")
            return _loader()

        def predict_dataloader(self):
            self._record("predict_dataloader")
            return _loader()

        def state_dict(self):
            self._record("state_dict")
            return super().state_dict()

        def load_state_dict(self, state_dict):
            self._record("load_state_dict")
            return super().load_state_dict(state_dict)

    class RecordingCallback(pl_module.Callback):
        def __init__(self, path):
            super().__init__()
            self.record_path = str(path)
            self._trainer = None  # last trainer seen, for state_dict/load_state_dict

        def __getstate__(self):
            state = self.__dict__.copy()
            state["_trainer"] = None
            return state

        def _record(self, name: str, trainer=None) -> None:
            if trainer is not None:
                self._trainer = trainer
            _append(self.record_path, trainer or self._trainer, "Callback." + name)

        def setup(self, trainer, pl_module, stage):
            self._record("setup", trainer)
            return super().setup(trainer, pl_module, stage)

        def teardown(self, trainer, pl_module, stage):
            self._record("teardown", trainer)
            return super().teardown(trainer, pl_module, stage)

        def on_fit_start(self, trainer, pl_module):
            self._record("on_fit_start", trainer)
            return super().on_fit_start(trainer, pl_module)

        def on_fit_end(self, trainer, pl_module):
            self._record("on_fit_end", trainer)
            return super().on_fit_end(trainer, pl_module)

        def on_sanity_check_start(self, trainer, pl_module):
            self._record("on_sanity_check_start", trainer)
            return super().on_sanity_check_start(trainer, pl_module)

        def on_sanity_check_end(self, trainer, pl_module):
            self._record("on_sanity_check_end", trainer)
            return super().on_sanity_check_end(trainer, pl_module)

        def on_train_start(self, trainer, pl_module):
            self._record("on_train_start", trainer)
            return super().on_train_start(trainer, pl_module)

        def on_train_end(self, trainer, pl_module):
            self._record("on_train_end", trainer)
            return super().on_train_end(trainer, pl_module)

        def on_train_epoch_start(self, trainer, pl_module):
            self._record("on_train_epoch_start", trainer)
            return super().on_train_epoch_start(trainer, pl_module)

        def on_train_epoch_end(self, trainer, pl_module):
            self._record("on_train_epoch_end", trainer)
            return super().on_train_epoch_end(trainer, pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._record("on_train_batch_start", trainer)
            return super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._record("on_train_batch_end", trainer)
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

        def on_validation_start(self, trainer, pl_module):
            self._record("on_validation_start", trainer)
            return super().on_validation_start(trainer, pl_module)

        def on_validation_end(self, trainer, pl_module):
            self._record("on_validation_end", trainer)
            return super().on_validation_end(trainer, pl_module)

        def on_validation_epoch_start(self, trainer, pl_module):
            self._record("on_validation_epoch_start", trainer)
            return super().on_validation_epoch_start(trainer, pl_module)

        def on_validation_epoch_end(self, trainer, pl_module):
            self._record("on_validation_epoch_end", trainer)
            return super().on_validation_epoch_end(trainer, pl_module)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self._record("on_validation_batch_start", trainer)
            return super().on_validation_batch_start(
                trainer, pl_module, batch, batch_idx, dataloader_idx
            )

        def on_validation_batch_end(
            self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
        ):
            self._record("on_validation_batch_end", trainer)
            return super().on_validation_batch_end(
                trainer, pl_module, outputs, batch, batch_idx, dataloader_idx
            )

        def on_test_start(self, trainer, pl_module):
            self._record("on_test_start", trainer)
            return super().on_test_start(trainer, pl_module)

        def on_test_end(self, trainer, pl_module):
            self._record("on_test_end", trainer)
            return super().on_test_end(trainer, pl_module)

        def on_test_epoch_start(self, trainer, pl_module):
            self._record("on_test_epoch_start", trainer)
            return super().on_test_epoch_start(trainer, pl_module)

        def on_test_epoch_end(self, trainer, pl_module):
            self._record("on_test_epoch_end", trainer)
            return super().on_test_epoch_end(trainer, pl_module)

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self._record("on_test_batch_start", trainer)
            return super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

        def on_test_batch_end(
            self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
        ):
            self._record("on_test_batch_end", trainer)
            return super().on_test_batch_end(
                trainer, pl_module, outputs, batch, batch_idx, dataloader_idx
            )

        def on_predict_start(self, trainer, pl_module):
            self._record("on_predict_start", trainer)
            return super().on_predict_start(trainer, pl_module)

        def on_predict_end(self, trainer, pl_module):
            self._record("on_predict_end", trainer)
            return super().on_predict_end(trainer, pl_module)

        def on_predict_epoch_start(self, trainer, pl_module):
            self._record("on_predict_epoch_start", trainer)
            return super().on_predict_epoch_start(trainer, pl_module)

        def on_predict_epoch_end(self, trainer, pl_module):
            self._record("on_predict_epoch_end", trainer)
            return super().on_predict_epoch_end(trainer, pl_module)

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self._record("on_predict_batch_start", trainer)
            return super().on_predict_batch_start(
                trainer, pl_module, batch, batch_idx, dataloader_idx
            )

        def on_predict_batch_end(
            self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
        ):
            self._record("on_predict_batch_end", trainer)
            return super().on_predict_batch_end(
                trainer, pl_module, outputs, batch, batch_idx, dataloader_idx
            )

        def on_before_backward(self, trainer, pl_module, loss):
            self._record("on_before_backward", trainer)
            return super().on_before_backward(trainer, pl_module, loss)

        def on_after_backward(self, trainer, pl_module):
            self._record("on_after_backward", trainer)
            return super().on_after_backward(trainer, pl_module)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self._record("on_before_optimizer_step", trainer)
            return super().on_before_optimizer_step(trainer, pl_module, optimizer)

        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            self._record("on_before_zero_grad", trainer)
            return super().on_before_zero_grad(trainer, pl_module, optimizer)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            self._record("on_save_checkpoint", trainer)
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)

        def on_load_checkpoint(self, trainer, pl_module, checkpoint):
            self._record("on_load_checkpoint", trainer)
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)

        def on_exception(self, trainer, pl_module, exception):
            self._record("on_exception", trainer)
            return super().on_exception(trainer, pl_module, exception)

        def state_dict(self):
            self._record("state_dict")
            return super().state_dict()

        def load_state_dict(self, state_dict):
            self._record("load_state_dict")
            return super().load_state_dict(state_dict)

    return RecordingModule, RecordingDataModule, RecordingCallback
