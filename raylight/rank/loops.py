"""The per-rank loops: fit (one epoch per driver call), evaluation and prediction.

Read top to bottom, one batch goes: loader -> batch-transfer hooks ->
``on_train_batch_start`` -> ``optimizer_step`` running the closure (``training_step``,
zero_grad, backward) and then unscale, clipping and the step -> schedulers ->
``on_train_batch_end`` -> step logging -> validation when due. How the step runs on this
rank (DDP's wrapper and gradient sync, precision, the scaler) is ``trainer.strategy``
(``strategy.py``); the loops never branch on it. Hooks run through ``hooks.call`` in
Lightning 2.x's order (``tests/test_hook_order.py`` holds us to it).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader

from raylight.module import LightningModule, move_data_to_device
from raylight.rank import checkpointing, hooks
from raylight.rank.checkpointing import Repartition, Resume
from raylight.rank.data import (
    epoch_order,
    has_source,
    is_overridden,
    limited,
    remainder_loader,
    remaining_after,
    request_loaders,
    set_epoch,
    skip_batches,
    while_every_rank_has_one,
)
from raylight.rank.logging import MetricLog, to_floats
from raylight.rank.rank_trainer import RankTrainer
from raylight.seed import restore_rng
from raylight.shared import checkpoint_index, storage
from raylight.shared.config import MisconfigurationException


# ---- fit ----------------------------------------------------------------------------------
def fit_start(trainer: RankTrainer, sanity_check: bool) -> None:
    """``on_fit_start``, the sanity check, then ``on_train_start``.

    Loaders are requested where Lightning requests them: the val loaders when the first
    validation starts, the train loader right before ``on_train_start``.
    """
    trainer._validation_enabled = _validation_enabled(trainer)
    hooks.call(trainer, "on_fit_start")
    trainer.lightning_module.zero_grad(set_to_none=True)
    if sanity_check and trainer._validation_enabled:
        trainer.sanity_checking = True
        hooks.call_callbacks(trainer, "on_sanity_check_start")
        _ensure_val_loaders(trainer)
        sanity = trainer.config.num_sanity_val_steps
        limits = [n if sanity == -1 else min(n, sanity) for n in trainer.num_val_batches]
        if any(limits):
            run_evaluation(trainer, "validate", trainer.val_dataloaders, limits)
        hooks.call_callbacks(trainer, "on_sanity_check_end")
        trainer.sanity_checking = False
        # Sanity-check metrics are not real results: Lightning drops them.
        trainer.callback_metrics, trainer.logged_metrics = {}, {}
        trainer.progress_bar_metrics = {}
        trainer._log_rows.clear()
    if trainer.train_dataloader is None:  # configure_optimizers may have asked for it already
        trainer._load_train_loader()
    trainer.stage = "train"
    # What on_train_start logs counts towards the first epoch, as in Lightning.
    trainer._results = trainer._train_results = MetricLog(trainer._all_reduce, trainer.device)
    hooks.call(trainer, "on_train_start")


def train_epoch(trainer: RankTrainer, epoch: int, resume: Resume | None = None) -> dict[str, Any]:
    """Run epoch ``epoch`` on this rank: its batches, its validations, its epoch-end hooks.
    ``resume``: where a restored checkpoint left this epoch (the first epoch of a resumed fit)."""
    trainer.current_epoch, trainer.stage = epoch, "train"
    results = trainer._results = trainer._train_results or MetricLog(
        trainer._all_reduce, trainer.device
    )
    trainer._train_results = None
    resume = resume or Resume(epoch)
    _reload_loaders_if_due(trainer, epoch, resume)
    loader = trainer.train_dataloader
    set_epoch(loader, epoch)
    num_batches = trainer.num_training_batches
    val_every = _val_check_batches(trainer)
    skip = resume.batches_to_skip
    trainer._epoch_order = None
    if resume.repartition is not None:
        loader, num_batches = _remainder_of_epoch(trainer, loader, epoch, resume.repartition)
    trainer._resume_point = (epoch, skip)
    if trainer._poster is not None:
        trainer._poster.start_epoch()
    if not resume.mid_epoch:  # a resumed epoch's on_train_epoch_start already ran
        hooks.call(trainer, "on_train_epoch_start")
    # Creating the iterator draws from the torch generator. A mid-epoch checkpoint's states
    # were taken after that draw, so they are restored after it; an epoch-end one before.
    if resume.rng_states is not None and not resume.mid_epoch:
        restore_rng(resume.rng_states)
    batches = iter(limited(skip_batches(loader, skip), num_batches - skip))
    if resume.rng_states is not None and resume.mid_epoch:
        restore_rng(resume.rng_states)
    batches = while_every_rank_has_one(trainer, loader, batches, "train")
    batch_idx, ran_out = skip - 1, True
    for batch_idx, batch in enumerate(batches, start=skip):
        if not _train_batch(trainer, results, batch, batch_idx, num_batches, val_every):
            ran_out = False
            break
    # A loader of unknown length (an IterableDataset) ends its epoch by running out.
    if batch_idx + 1 == num_batches or (ran_out and num_batches == math.inf):
        trainer._resume_point = (epoch + 1, 0)
    if trainer._stopped_at is None:  # else the epoch is not over: no epoch-end hooks
        _end_train_epoch(trainer, results, batch_idx)
    return epoch_summary(trainer)


def _end_train_epoch(trainer: RankTrainer, results: MetricLog, last_batch_idx: int) -> None:
    epoch = trainer.current_epoch
    # Callbacks see the epoch's values in on_train_epoch_end; monitoring callbacks also see
    # what the module logged there.
    _merge_metrics(trainer, *results.epoch_metrics())
    hooks.call(trainer, "on_train_epoch_end", part="before_monitors")
    callback, logged, bar = results.epoch_metrics()
    _merge_metrics(trainer, callback, logged, bar)
    hooks.call(trainer, "on_train_epoch_end", part="monitors")
    _step_schedulers(trainer, "epoch", epoch + 1, plateau=True)
    if logged:
        trainer._log_rows.append((trainer._batches_that_stepped - 1, _with_epoch(trainer, logged)))
    _update_closing_validation(trainer, last_batch_idx)
    results.reset_metrics()  # torchmetrics objects start the next epoch empty, as in Lightning


def _remainder_of_epoch(
    trainer: RankTrainer, loader: Any, epoch: int, plan: Repartition
) -> tuple[Any, int | float]:
    """This rank's loader for what a checkpoint from another world size left of ``epoch``."""
    order = plan.order
    if order is None and (plan.sampler_args is None or not isinstance(loader, DataLoader)):
        warnings.warn(
            f"epoch {epoch} was interrupted at world size {plan.world_size} and resumes at "
            f"{trainer.world_size}, but its loader has no DistributedSampler to re-partition "
            "(an IterableDataset or a custom sampler): the epoch restarts from its first batch.",
            stacklevel=2,
        )
        return loader, trainer.num_training_batches
    if order is None:
        order = epoch_order(len(loader.dataset), epoch, plan.world_size, plan.sampler_args)
    remaining = remaining_after(order, plan.batches_done, loader.batch_size, plan.world_size)
    trainer._epoch_order = remaining  # a checkpoint during this epoch records it
    resumed = remainder_loader(loader, remaining, trainer.global_rank, trainer.world_size)
    return resumed, len(resumed.batch_sampler)


def _train_batch(
    trainer: RankTrainer,
    results: MetricLog,
    batch: Any,
    batch_idx: int,
    num_batches: int | float,
    val_every: int,
) -> bool:
    """One training batch, its scheduler steps and any validation due; False ends the epoch."""
    epoch, module = trainer.current_epoch, trainer.lightning_module
    trainer._batch_idx = batch_idx
    trainer._is_last_batch = batch_idx + 1 == num_batches
    # A checkpoint write that failed for good stops the fit here, not after more epochs.
    trainer._writer.raise_if_failed()
    trainer._watch.begin_batch()
    batch = transfer_batch(trainer, batch, 0)
    results.batch = batch
    if hooks.call(trainer, "on_train_batch_start", batch, batch_idx) == -1:
        trainer._watch.end_batch()
        return False  # Lightning: returning -1 ends the epoch early
    stepped_before = trainer.global_step
    if module.automatic_optimization:
        outputs = _automatic_step(trainer, batch, batch_idx, num_batches)
    else:
        outputs = _manual_step(trainer, batch, batch_idx)
    stepped = trainer.global_step > stepped_before
    if stepped:
        trainer._resume_point = (epoch, batch_idx + 1)  # a checkpoint resumes after this batch
        trainer._step_uncounted = True
    last = batch_idx + 1 == num_batches
    # Lightning steps schedulers before on_train_batch_end; epoch-interval ones on the
    # epoch's last batch, before its validation; plateau ones once their metric exists.
    if stepped:
        _step_schedulers(trainer, "step", batch_idx + 1, plateau=False)
    if last:
        _step_schedulers(trainer, "epoch", epoch + 1, plateau=False)
    trainer._results = results  # a hook may have run a nested loop
    hooks.call(trainer, "on_train_batch_end", outputs, batch, batch_idx)
    _publish_step_metrics(trainer, results, stepped)
    if trainer._poster is not None:
        trainer._poster.after_batch(trainer, batch, batch_idx)
    trainer._watch.end_batch()  # what follows (validation, a stop) is timed on its own
    # Lightning stops mid-epoch only once min_epochs epochs have completed.
    stopping = trainer.should_stop and epoch >= trainer.config.min_epochs
    # Lightning's rule: every val_check_batch batches (the last batch included when the
    # interval divides the epoch), and once more when stopping early.
    if val_every and ((batch_idx + 1) % val_every == 0 or stopping):
        # Lightning counts this batch in its loggers' step only after the validation.
        _validate_during_fit(trainer, trainer._batches_that_stepped - stepped)
        trainer._results = results
    if stepped:
        _step_schedulers(trainer, "step", batch_idx + 1, plateau=True)
    trainer._batch_idx = None
    if (
        stepped
        and trainer._stop_check is not None
        and trainer._stop_check.should_stop(trainer.device)
    ):
        _save_and_stop(trainer)  # preempted: the ranks agreed on this batch
        return False
    # A validation may itself have asked to stop (EarlyStopping): Lightning stops right after it.
    stopping = trainer.should_stop and epoch >= trainer.config.min_epochs
    return not (stopping or _max_steps_reached(trainer))


def fit_end(trainer: RankTrainer) -> None:
    trainer.stage = None
    hooks.call(trainer, "on_train_end")
    hooks.call(trainer, "on_fit_end")


def epoch_summary(trainer: RankTrainer) -> dict[str, Any]:
    """What the driver needs after each epoch; rows go out once and are then dropped."""
    if trainer._poster is not None:
        trainer._poster.settle()
    summary = {
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "batches_that_stepped": trainer._batches_that_stepped,
        "should_stop": trainer.should_stop,
        "num_training_batches": trainer.num_training_batches,
        "callback_metrics": to_floats(trainer.callback_metrics),
        "logged_metrics": to_floats(trainer.logged_metrics),
        "progress_bar_metrics": to_floats(trainer.progress_bar_metrics),
        "log_rows": list(trainer._log_rows),
        "logger_calls": trainer._logger_calls,
        "validations": list(trainer._fit_validations),
        "validation_enabled": trainer._validation_enabled,
        "stopped_at": trainer._stopped_at,
        "notices": trainer._take_notices(),
    }
    trainer._log_rows.clear()
    trainer._logger_calls = []
    trainer._fit_validations.clear()
    trainer._stopped_at = None
    return summary


def _save_and_stop(trainer: RankTrainer) -> None:
    """Save where the ranks stopped (every rank takes part), committed before returning."""
    root = trainer.default_root_dir
    path = storage.join(
        root, "recovery", f"stopped-epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
    )
    entry = checkpoint_index.index_entry(
        path,
        epoch=trainer.current_epoch,
        global_step=trainer.global_step,
        run_id=trainer.config.run_id,
    )

    def commit() -> None:
        checkpoint_index.update_index(root, entry, [])

    checkpointing.save_from_rank(
        trainer, path, on_commit=commit if trainer.is_global_zero else None
    )
    trainer._writer.wait()
    trainer._stopped_at = path


# ---- one training batch -------------------------------------------------------------------
def _automatic_step(trainer: RankTrainer, batch: Any, batch_idx: int, num_batches: int) -> Any:
    strategy = trainer.strategy
    if not trainer.optimizers:
        return strategy.training_step(batch, batch_idx)
    optimizer = trainer._lightning_optimizers[0]
    accumulate = trainer.config.accumulate_grad_batches
    # The optimizer steps at the end of every accumulation window and at the epoch's last batch.
    steps_now = (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == num_batches
    zero_grad_now = batch_idx % accumulate == 0
    output: dict[str, Any] = {}

    def closure() -> torch.Tensor | None:
        step_output = strategy.training_step(batch, batch_idx)
        try:
            loss = _loss_of(step_output)
        except MisconfigurationException as error:
            hooks.tag_error(error, "training_step")
            raise
        output["value"] = step_output
        if zero_grad_now:
            hooks.call(trainer, "on_before_zero_grad", optimizer.optimizer)
            hooks.call_module(
                trainer,
                "optimizer_zero_grad",
                trainer.current_epoch,
                batch_idx,
                optimizer.optimizer,
            )
        if loss is None:
            return None
        # A window's gradients add up: each batch contributes its share of the mean loss.
        strategy.backward(loss / accumulate if accumulate > 1 else loss)
        return loss.detach()

    if steps_now:
        # The module's hook calls optimizer.step(closure): the closure's backward, then
        # unscale, on_before_optimizer_step and clipping, then the step (strategy.py).
        hooks.call_module(
            trainer, "optimizer_step", trainer.current_epoch, batch_idx, optimizer, closure
        )
    else:
        with strategy.no_sync():  # gradients sync once per window, on its last batch
            closure()
    return _batch_end_outputs(output.get("value"))


def _manual_step(trainer: RankTrainer, batch: Any, batch_idx: int) -> Any:
    output = trainer.strategy.training_step(batch, batch_idx)
    trainer.strategy.after_manual_step()
    if output is not None and not isinstance(output, torch.Tensor | dict):
        raise MisconfigurationException(_bad_step_output(output))
    return output


def _loss_of(step_output: Any) -> torch.Tensor | None:
    if step_output is None:
        return None
    if isinstance(step_output, torch.Tensor):
        return step_output
    if isinstance(step_output, dict):
        if "loss" not in step_output:
            raise MisconfigurationException(
                f"training_step returned a dict without a 'loss' key (keys: {sorted(step_output)}): "
                "return {'loss': loss, ...}."
            )
        return step_output["loss"]
    raise MisconfigurationException(_bad_step_output(step_output))


def _bad_step_output(output: Any) -> str:
    return (
        f"training_step returned a {type(output).__name__}: return the loss tensor, a dict with "
        "a 'loss' key, or None to skip the batch."
    )


def _batch_end_outputs(step_output: Any) -> Any:
    if isinstance(step_output, torch.Tensor):
        return {"loss": step_output.detach()}
    if isinstance(step_output, dict):
        return {
            k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in step_output.items()
        }
    return step_output


def transfer_batch(trainer: RankTrainer, batch: Any, dataloader_idx: int) -> Any:
    """Lightning's three batch-transfer hooks (datamodule first for the before/after ones)."""
    batch = _transfer_hook(trainer, "on_before_batch_transfer", batch, dataloader_idx)
    batch = hooks.call_module(
        trainer, "transfer_batch_to_device", batch, trainer.device, dataloader_idx
    )
    return _transfer_hook(trainer, "on_after_batch_transfer", batch, dataloader_idx)


def _transfer_hook(trainer: RankTrainer, hook: str, batch: Any, dataloader_idx: int) -> Any:
    # Lightning calls one of the two: the module's if it overrides the hook, else the
    # datamodule's if that does. Decided once per stage: this runs on every batch.
    owners = trainer._batch_hook_owners
    if hook not in owners:
        module_overrides = is_overridden(trainer.lightning_module, hook)
        owners[hook] = not module_overrides and is_overridden(trainer.datamodule, hook)
    if owners[hook]:
        return hooks.call_datamodule(trainer, hook, batch, dataloader_idx)
    return hooks.call_module(trainer, hook, batch, dataloader_idx)


# ---- metrics and schedulers -----------------------------------------------------------------
def _publish_step_metrics(trainer: RankTrainer, results: MetricLog, stepped: bool) -> None:
    callback, logged, bar = results.step_metrics()
    _merge_metrics(trainer, callback, logged, bar)
    # Lightning writes a logger row every log_every_n_steps optimizer steps.
    if stepped:
        trainer._batches_that_stepped += 1
        trainer._step_uncounted = False
        step = trainer._batches_that_stepped - 1
        every = trainer.log_every_n_steps  # 0: no step rows (barebones)
        if logged and trainer.is_global_zero and every and (step + 1) % every == 0:
            trainer._log_rows.append((step, _with_epoch(trainer, logged)))


def _merge_metrics(trainer: RankTrainer, callback: dict, logged: dict, bar: dict) -> None:
    trainer.callback_metrics.update(callback)
    trainer.logged_metrics.update(logged)
    trainer.progress_bar_metrics.update(bar)


def _with_epoch(trainer: RankTrainer, logged: dict[str, torch.Tensor]) -> dict[str, float]:
    row = to_floats(logged) if trainer.is_global_zero else {}
    row["epoch"] = trainer.current_epoch  # an int, as Lightning logs it
    return row


def _step_schedulers(trainer: RankTrainer, interval: str, count: int, plateau: bool) -> None:
    """Step the ``interval`` schedulers whose ``frequency`` divides ``count`` (Lightning counts
    batches within the epoch for "step", epochs for "epoch", both from 1)."""
    if not trainer.lightning_module.automatic_optimization:
        return  # with manual optimization the user steps schedulers, as in Lightning
    for config in trainer.lr_scheduler_configs:
        if config.interval != interval or config.reduce_on_plateau != plateau:
            continue
        if count % config.frequency != 0:
            continue
        metric = None
        if plateau:
            metric = trainer.callback_metrics.get(config.monitor)
            if metric is None:
                if config.strict:
                    raise MisconfigurationException(
                        f"ReduceLROnPlateau conditioned on metric {config.monitor!r} which is not "
                        f"available. Available metrics are: {sorted(trainer.callback_metrics)}. "
                        "Condition can be set using `monitor` key in lr scheduler dict."
                    )
                continue
        hooks.call_module(trainer, "lr_scheduler_step", config.scheduler, metric)


def _max_steps_reached(trainer: RankTrainer) -> bool:
    return trainer.config.max_steps != -1 and trainer.global_step >= trainer.config.max_steps


# ---- validation scheduling --------------------------------------------------------------------
def _validation_enabled(trainer: RankTrainer) -> bool:
    """Lightning's ``enable_validation``: decided without asking for the loaders."""
    overridden = (
        type(trainer.lightning_module).validation_step is not LightningModule.validation_step
    )
    return overridden and trainer.config.limit_val_batches != 0 and has_source(trainer, "val")


def _ensure_val_loaders(trainer: RankTrainer) -> None:
    if trainer._val_requested:
        return
    trainer.val_dataloaders, trainer.num_val_batches = request_loaders(trainer, "val")
    trainer._val_requested = True
    trainer._loaders_loaded_at["val"] = trainer.current_epoch


def _reload_loaders_if_due(trainer: RankTrainer, epoch: int, resume: Resume) -> None:
    """Lightning's reload_dataloaders_every_n_epochs: ask the hooks for new loaders once
    that many epochs have passed since they were last asked (never mid-epoch)."""
    every = trainer.config.reload_dataloaders_every_n_epochs
    if not every or resume.mid_epoch:
        return
    loaded_at = trainer._loaders_loaded_at
    if epoch - loaded_at.get("train", epoch) >= every:
        trainer._load_train_loader()
    if epoch - loaded_at.get("val", epoch) >= every:
        trainer._val_requested = False  # the next validation asks again


def _val_check_batches(trainer: RankTrainer) -> int:
    """Batches between validation runs in this epoch; 0 when this epoch has none."""
    every = trainer.config.check_val_every_n_epoch
    due = every is None or (trainer.current_epoch + 1) % every == 0
    if not due or not _validation_enabled(trainer):
        return 0
    interval, num_batches = trainer.config.val_check_interval, trainer.num_training_batches
    if isinstance(interval, float):
        if num_batches == math.inf:
            return 0
        return max(1, int(num_batches * interval))
    return interval


def _update_closing_validation(trainer: RankTrainer, last_batch_idx: int) -> None:
    """A validation after the epoch's last batch ends the epoch: its point also holds what
    the epoch's end logged (the epoch's train metrics), as an epoch-end report would."""
    validations = trainer._fit_validations
    if validations and validations[-1]["batch_idx"] == last_batch_idx:
        validations[-1]["callback_metrics"] = to_floats(trainer.callback_metrics)


def _validate_during_fit(trainer: RankTrainer, log_step: int) -> None:
    _ensure_val_loaders(trainer)
    if not any(trainer.num_val_batches):
        return
    hooks.call_module(trainer, "on_validation_model_zero_grad")
    run_evaluation(trainer, "validate", trainer.val_dataloaders, trainer.num_val_batches, log_step)
    trainer.stage = "train"
    if trainer.is_global_zero:  # one point per validation run: Tune hears of each
        trainer._fit_validations.append(
            {
                "callback_metrics": to_floats(trainer.callback_metrics),
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "batch_idx": trainer._batch_idx,
            }
        )


# ---- evaluation and prediction ----------------------------------------------------------------
def run_evaluation(
    trainer: RankTrainer,
    stage: str,
    loaders: list[Any],
    limits: list[int],
    log_step: int | None = None,
) -> list[dict[str, float]]:
    """One validation or test run over every loader; returns the per-loader epoch metrics,
    and logs them at ``log_step`` (by default the loggers' current step)."""
    prefix = "validation" if stage == "validate" else "test"
    step_name = "validation_step" if stage == "validate" else "test_step"
    previous_stage, trainer.stage = trainer.stage, stage
    results = trainer._results = MetricLog(trainer._all_reduce, trainer.device)
    hooks.call_module(trainer, f"on_{prefix}_model_eval")
    with trainer.strategy.evaluation_context():
        hooks.call(trainer, f"on_{prefix}_start")
        hooks.call(trainer, f"on_{prefix}_epoch_start")
        several = len(loaders) > 1
        for dataloader_idx, (loader, limit) in enumerate(zip(loaders, limits, strict=True)):
            results.dataloader_idx = dataloader_idx if several else None
            extra = (dataloader_idx,) if several else ()
            batches = while_every_rank_has_one(
                trainer, loader, iter(limited(loader, limit)), prefix
            )
            for batch_idx, batch in enumerate(batches):
                trainer._watch.begin_batch()
                trainer._batch_idx = batch_idx
                batch = transfer_batch(trainer, batch, dataloader_idx)
                results.batch = batch
                hooks.call(trainer, f"on_{prefix}_batch_start", batch, batch_idx, *extra)
                output = trainer.strategy.evaluation_step(step_name, batch, batch_idx, *extra)
                hooks.call(trainer, f"on_{prefix}_batch_end", output, batch, batch_idx, *extra)
                if not trainer.sanity_checking:
                    _log_evaluation_step(trainer, results, stage, dataloader_idx)
                trainer._watch.end_batch()
        trainer._batch_idx = None
        results.dataloader_idx = None
        hooks.call(trainer, f"on_{prefix}_epoch_end")
        callback, logged, bar = results.epoch_metrics()
        if not trainer.sanity_checking:
            _merge_metrics(trainer, callback, logged, bar)
            trainer._validation_has_run = trainer._validation_has_run or stage == "validate"
        hooks.call(trainer, f"on_{prefix}_end", part="before_monitors")
        hooks.call(trainer, f"on_{prefix}_end", part="monitors")
        results.reset_metrics()
    hooks.call_module(trainer, f"on_{prefix}_model_train")
    if logged and not trainer.sanity_checking:
        step = trainer._batches_that_stepped if log_step is None else log_step
        trainer._log_rows.append((step, _with_epoch(trainer, logged)))
    trainer.stage = previous_stage
    return _per_loader(to_floats(logged), len(loaders))


def _log_evaluation_step(
    trainer: RankTrainer, results: MetricLog, stage: str, dataloader_idx: int
) -> None:
    """Lightning writes a validation or test step's ``on_step`` values at once, at a step
    of their own: the batches of that loader this stage has seen (over the whole fit for
    validation), with no ``epoch`` column."""
    key = (stage, dataloader_idx)
    seen = trainer._evaluation_batches_seen.get(key, 0)
    trainer._evaluation_batches_seen[key] = seen + 1
    _, logged, _ = results.step_metrics()
    results.clear_step_values()  # a value logged at one step is not logged again at the next
    if logged and trainer.is_global_zero:
        trainer._log_rows.append((seen, to_floats(logged)))


def _per_loader(logged: dict[str, float], num_loaders: int) -> list[dict[str, float]]:
    """Split metrics by their ``/dataloader_idx_N`` suffix, as Lightning's return value is."""
    per_loader: list[dict[str, float]] = [{} for _ in range(num_loaders)]
    for name, value in logged.items():
        head, _, idx = name.rpartition("/dataloader_idx_")
        if head and idx.isdigit() and int(idx) < num_loaders:
            per_loader[int(idx)][name] = value
        else:
            for metrics in per_loader:
                metrics[name] = value
    return per_loader


def run_predict(trainer: RankTrainer, loaders: list[Any], limits: list[int]) -> list[list[Any]]:
    """Every loader's batch outputs on this rank, moved to CPU for the trip to the driver."""
    trainer.stage = "predict"
    hooks.call_module(trainer, "on_predict_model_eval")
    predictions: list[list[Any]] = []
    with trainer.strategy.evaluation_context():
        hooks.call(trainer, "on_predict_start")
        hooks.call(trainer, "on_predict_epoch_start")
        several = len(loaders) > 1
        for dataloader_idx, (loader, limit) in enumerate(zip(loaders, limits, strict=True)):
            extra = (dataloader_idx,) if several else ()
            outputs: list[Any] = []
            for batch_idx, batch in enumerate(limited(loader, limit)):
                trainer._watch.begin_batch()
                trainer._batch_idx = batch_idx
                batch = transfer_batch(trainer, batch, dataloader_idx)
                hooks.call(trainer, "on_predict_batch_start", batch, batch_idx, *extra)
                output = trainer.strategy.evaluation_step("predict_step", batch, batch_idx, *extra)
                hooks.call(trainer, "on_predict_batch_end", output, batch, batch_idx, *extra)
                outputs.append(move_data_to_device(output, torch.device("cpu")))
                trainer._watch.end_batch()
            predictions.append(outputs)
        trainer._batch_idx = None
        hooks.call(trainer, "on_predict_epoch_end")
        hooks.call(trainer, "on_predict_end")
    trainer.stage = None
    return predictions
