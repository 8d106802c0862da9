"""``MetricLog``: the ``self.log`` rules of one loop on one rank, with a fake all-reduce."""

import pytest
import torch

from raylight.rank.logging import MetricLog, extract_batch_size, to_floats


class FakeAllReduce:
    """Records every reduction and answers with ``answer(tensor, op)``."""

    def __init__(self, answer=None):
        self.calls = []
        self._answer = answer or (lambda tensor, op: tensor)

    def __call__(self, tensor, op):
        assert isinstance(tensor, torch.Tensor)
        self.calls.append((float(tensor), op))
        return self._answer(tensor, op)


def never_reduce(tensor, op):
    raise AssertionError(f"all_reduce({tensor}, {op!r}) called without sync_dist")


def log(results, fx, name, value, **overrides):
    kwargs = {
        "prog_bar": False,
        "logger": True,
        "on_step": None,
        "on_epoch": None,
        "reduce_fx": "mean",
        "sync_dist": False,
        "add_dataloader_idx": True,
        "batch_size": None,
    }
    kwargs.update(overrides)
    results.log(fx, name, value, **kwargs)


def floats(metrics):
    return {name: pytest.approx(value) for name, value in to_floats(metrics).items()}


# ---- epoch aggregation ---------------------------------------------------------------------------


def test_epoch_mean_is_weighted_by_inferred_batch_size():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(2, 3)
    log(results, "validation_step", "loss", 1.0)
    results.batch = torch.zeros(6, 3)
    log(results, "validation_step", "loss", 4.0)
    callback, logged, _ = results.epoch_metrics()
    # (1.0 * 2 + 4.0 * 6) / 8, not the unweighted (1.0 + 4.0) / 2
    assert float(logged["loss"]) == pytest.approx(3.25)
    assert float(callback["loss"]) == pytest.approx(3.25)


def test_explicit_batch_size_overrides_the_batch():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(100)
    log(results, "validation_step", "loss", 1.0, batch_size=2)
    log(results, "validation_step", "loss", 4.0, batch_size=6)
    _, logged, _ = results.epoch_metrics()
    assert float(logged["loss"]) == pytest.approx(3.25)


def test_epoch_mean_keeps_the_value_dtype():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(3)
    log(results, "validation_step", "acc", torch.tensor(0.5))
    _, logged, _ = results.epoch_metrics()
    assert logged["acc"].dtype == torch.float32
    assert logged["acc"].shape == ()


@pytest.mark.parametrize(
    ("reduce_fx", "expected"),
    [
        ("sum", 7.0),
        ("max", 4.0),
        ("min", 1.0),
        ("mean", 7.0 / 3),
        (torch.sum, 7.0),
        (torch.max, 4.0),
        (torch.min, 1.0),
        (torch.mean, 7.0 / 3),
    ],
)
def test_reduce_fx(reduce_fx, expected):
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(5)  # same size every step: the mean is unweighted
    for value in (1.0, 4.0, 2.0):
        log(results, "validation_step", "m", value, reduce_fx=reduce_fx)
    _, logged, _ = results.epoch_metrics()
    assert float(logged["m"]) == pytest.approx(expected)


def test_sum_and_max_ignore_batch_size():
    results = MetricLog(never_reduce)
    for size, value in ((1, 2.0), (9, 3.0)):
        results.batch = torch.zeros(size)
        log(results, "validation_step", "total", value, reduce_fx="sum")
        log(results, "validation_step", "peak", value, reduce_fx="max")
    _, logged, _ = results.epoch_metrics()
    assert floats(logged) == {"total": 5.0, "peak": 3.0}


def test_unsupported_reduce_fx_raises():
    results = MetricLog(never_reduce)
    with pytest.raises(ValueError, match="reduce_fx"):
        log(results, "validation_step", "m", 1.0, reduce_fx="median")


def test_reset_forgets_everything():
    results = MetricLog(never_reduce)
    log(results, "training_step", "loss", 1.0, on_epoch=True)
    results.reset()
    assert results.step_metrics() == ({}, {}, {})
    assert results.epoch_metrics() == ({}, {}, {})


# ---- on_step / on_epoch defaults per hook ----------------------------------------------------------


@pytest.mark.parametrize(
    "fx",
    [
        "training_step",
        "on_train_batch_start",
        "on_train_batch_end",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
        "optimizer_step",
    ],
)
def test_training_batch_hooks_log_on_step_only_by_default(fx):
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(4)
    log(results, fx, "loss", 2.0)
    callback, logged, _ = results.step_metrics()
    assert floats(logged) == {"loss": 2.0}
    assert floats(callback) == {"loss": 2.0}
    assert results.epoch_metrics() == ({}, {}, {})


@pytest.mark.parametrize(
    "fx",
    [
        "validation_step",
        "test_step",
        "on_validation_batch_end",
        "on_test_batch_start",
        "on_train_epoch_end",
        "on_train_start",
        "on_validation_epoch_end",
        "on_test_epoch_start",
    ],
)
def test_evaluation_and_epoch_hooks_log_on_epoch_only_by_default(fx):
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(4)
    log(results, fx, "acc", 0.5)
    assert results.step_metrics() == ({}, {}, {})
    callback, logged, _ = results.epoch_metrics()
    assert floats(logged) == {"acc": 0.5}
    assert floats(callback) == {"acc": 0.5}


def test_explicit_flags_override_the_hook_defaults():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(4)
    log(results, "validation_step", "v", 3.0, on_step=True, on_epoch=False)
    log(results, "training_step", "t", 5.0, on_step=False, on_epoch=True)
    _, step_logged, _ = results.step_metrics()
    _, epoch_logged, _ = results.epoch_metrics()
    assert floats(step_logged) == {"v": 3.0}
    assert floats(epoch_logged) == {"t": 5.0}


# ---- forked keys, prog_bar, logger -----------------------------------------------------------------


def test_on_step_and_on_epoch_fork_the_key():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(2)
    log(results, "training_step", "loss", 1.0, on_step=True, on_epoch=True)
    results.batch = torch.zeros(6)
    log(results, "training_step", "loss", 4.0, on_step=True, on_epoch=True)

    step_callback, step_logged, _ = results.step_metrics()
    assert floats(step_logged) == {"loss_step": 4.0}  # the latest step, under name_step
    assert floats(step_callback) == {"loss": 4.0, "loss_step": 4.0}

    epoch_callback, epoch_logged, _ = results.epoch_metrics()
    assert floats(epoch_logged) == {"loss_epoch": 3.25}
    assert floats(epoch_callback) == {"loss": 3.25, "loss_epoch": 3.25}

    # what callback_metrics holds after the epoch: three keys, the bare one the epoch value
    callback_metrics = {**step_callback, **epoch_callback}
    assert floats(callback_metrics) == {"loss": 3.25, "loss_step": 4.0, "loss_epoch": 3.25}


def test_prog_bar_and_logger_flags_route_metrics():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(2)
    log(results, "training_step", "bar_only", 1.0, prog_bar=True, logger=False)
    log(results, "training_step", "logged_only", 2.0)
    log(results, "training_step", "both", 3.0, prog_bar=True, logger=True)
    callback, logged, bar = results.step_metrics()
    assert set(callback) == {"bar_only", "logged_only", "both"}
    assert floats(logged) == {"logged_only": 2.0, "both": 3.0}
    assert floats(bar) == {"bar_only": 1.0, "both": 3.0}


def test_forked_prog_bar_metric_shows_step_and_epoch_keys():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(2)
    log(results, "training_step", "loss", 2.0, on_step=True, on_epoch=True, prog_bar=True)
    _, _, step_bar = results.step_metrics()
    _, _, epoch_bar = results.epoch_metrics()
    assert floats(step_bar) == {"loss_step": 2.0}
    assert floats(epoch_bar) == {"loss_epoch": 2.0}


def test_logger_false_metric_still_reaches_callbacks_at_epoch_end():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(2)
    log(results, "validation_step", "val_loss", 0.25, logger=False)
    callback, logged, bar = results.epoch_metrics()
    assert floats(callback) == {"val_loss": 0.25}
    assert logged == {} and bar == {}


# ---- what may not be logged -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fx",
    [
        "setup",
        "teardown",
        "configure_optimizers",
        "configure_callbacks",
        "prepare_data",
        "on_fit_start",
        "on_fit_end",
        "on_train_end",
        "on_sanity_check_start",
        "train_dataloader",
        "on_save_checkpoint",
        "predict_step",
        None,
    ],
)
def test_logging_from_a_hook_that_may_not_log_raises_naming_the_hook(fx):
    results = MetricLog(never_reduce)
    with pytest.raises(ValueError, match=str(fx)):
        log(results, fx, "loss", 1.0)
    assert results.epoch_metrics() == ({}, {}, {})


@pytest.mark.parametrize("fx", ["on_validation_end", "on_test_end", "lr_scheduler_step"])
def test_lightning_forbids_logging_after_the_epoch_metrics_are_computed(fx):
    # Lightning's _FxValidator maps these hooks to None (`self.log` raises). In raylight the
    # evaluation loop computes epoch metrics *before* on_validation_end / on_test_end, so a
    # value logged there would be silently dropped.
    results = MetricLog(never_reduce)
    with pytest.raises(ValueError, match=fx):
        log(results, fx, "loss", 1.0)


@pytest.mark.parametrize("fx", ["backward", "configure_gradient_clipping", "optimizer_zero_grad"])
def test_lightning_allows_step_logging_in_optimization_hooks(fx):
    # raylight dispatches these hooks with _current_fx_name set to their name; Lightning's
    # _FxValidator allows logging in them (on_step by default).
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(2)
    log(results, fx, "grad_norm", 1.5)
    _, logged, _ = results.step_metrics()
    assert floats(logged) == {"grad_norm": 1.5}


@pytest.mark.parametrize("value", [torch.zeros(3), torch.ones(2, 2), torch.zeros(0)])
def test_non_scalar_tensor_raises(value):
    results = MetricLog(never_reduce)
    with pytest.raises(ValueError, match="loss"):
        log(results, "training_step", "loss", value)


def test_non_number_raises():
    results = MetricLog(never_reduce)
    with pytest.raises(ValueError, match="str"):
        log(results, "training_step", "loss", "high")


def test_one_element_and_int_values_become_float_scalars():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(2)
    log(results, "training_step", "a", torch.tensor([2.5]))
    log(results, "training_step", "b", torch.tensor(3))
    log(results, "training_step", "c", 7)
    log(results, "training_step", "d", True)
    _, logged, _ = results.step_metrics()
    for name in "abcd":
        assert logged[name].shape == ()
        assert logged[name].is_floating_point()
    assert floats(logged) == {"a": 2.5, "b": 3.0, "c": 7.0, "d": 1.0}


def test_logged_tensor_is_detached():
    results = MetricLog(never_reduce)
    weight = torch.tensor(2.0, requires_grad=True)
    log(results, "training_step", "loss", weight * 3)
    _, logged, _ = results.step_metrics()
    assert not logged["loss"].requires_grad


# ---- batch size inference --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "size"),
    [
        (torch.zeros(5, 3), 5),
        (torch.tensor(1.0), 1),
        ((torch.zeros(4, 2), torch.zeros(4)), 4),
        ([torch.zeros(3, 8), torch.zeros(3)], 3),
        ({"x": torch.zeros(7, 2), "y": torch.zeros(7)}, 7),
        ({"inputs": (torch.zeros(6, 1), torch.zeros(6)), "y": torch.zeros(6)}, 6),
        ("text", 1),
        (None, 1),
    ],
)
def test_extract_batch_size(batch, size):
    assert extract_batch_size(batch) == size


@pytest.mark.parametrize(
    ("batch", "size"),
    [
        ({"name": ["a", "b"], "x": torch.zeros(8, 2)}, 8),  # strings first, then the tensor
        ((3, torch.zeros(5)), 5),  # an int index before the tensor
        ({"id": "abc", "x": torch.zeros(9)}, 9),
    ],
)
def test_extract_batch_size_skips_leading_non_tensors(batch, size):
    # Lightning's extract_batch_size returns the first *tensor's* leading dimension; items
    # with no tensor in them yield nothing and the search goes on.
    assert extract_batch_size(batch) == size


# ---- several dataloaders ---------------------------------------------------------------------------


def test_dataloader_idx_suffix():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(2)
    results.dataloader_idx = 1
    log(results, "validation_step", "acc", 0.75)
    log(results, "validation_step", "raw", 0.5, add_dataloader_idx=False)
    callback, logged, _ = results.epoch_metrics()
    assert floats(logged) == {"acc/dataloader_idx_1": 0.75, "raw": 0.5}
    assert set(callback) == {"acc/dataloader_idx_1", "raw"}


def test_each_dataloader_gets_its_own_entry():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(2)
    for idx, value in ((0, 1.0), (1, 3.0)):
        results.dataloader_idx = idx
        log(results, "validation_step", "loss", value)
    _, logged, _ = results.epoch_metrics()
    assert floats(logged) == {"loss/dataloader_idx_0": 1.0, "loss/dataloader_idx_1": 3.0}


def test_no_suffix_without_dataloader_idx():
    results = MetricLog(never_reduce)
    results.batch = torch.zeros(2)
    log(results, "validation_step", "acc", 0.75)
    _, logged, _ = results.epoch_metrics()
    assert set(logged) == {"acc"}


# ---- sync_dist -------------------------------------------------------------------------------------


def test_sync_dist_mean_is_the_global_weighted_mean():
    # This rank logs 1.0 (batch 2) and 4.0 (batch 6): weighted total 26, weight 8.
    # The other rank logged 10.0 with batch 2: weighted total 20, weight 2.
    other_rank = {26.0: 20.0, 8.0: 2.0}
    reduce = FakeAllReduce(lambda tensor, op: tensor + other_rank[float(tensor)])
    results = MetricLog(reduce)
    results.batch = torch.zeros(2)
    log(results, "validation_step", "loss", 1.0, sync_dist=True)
    results.batch = torch.zeros(6)
    log(results, "validation_step", "loss", 4.0, sync_dist=True)
    assert reduce.calls == []  # epoch values reduce at epoch end, not per step

    _, logged, _ = results.epoch_metrics()
    # (26 + 20) / (8 + 2), not the mean of the ranks' means (3.25 + 10) / 2
    assert float(logged["loss"]) == pytest.approx(4.6)
    assert sorted(reduce.calls) == [(8.0, "sum"), (26.0, "sum")]


def test_sync_dist_with_doubling_all_reduce_keeps_identical_ranks_mean():
    reduce = FakeAllReduce(lambda tensor, op: tensor * 2)
    results = MetricLog(reduce)
    results.batch = torch.zeros(2)
    log(results, "validation_step", "loss", 1.0, sync_dist=True)
    results.batch = torch.zeros(6)
    log(results, "validation_step", "loss", 4.0, sync_dist=True)
    _, logged, _ = results.epoch_metrics()
    assert float(logged["loss"]) == pytest.approx(3.25)
    assert sorted(reduce.calls) == [(8.0, "sum"), (26.0, "sum")]


@pytest.mark.parametrize("reduce_fx", ["sum", "max", "min"])
def test_sync_dist_epoch_reduction_uses_reduce_fx(reduce_fx):
    reduce = FakeAllReduce(lambda tensor, op: tensor * 2)
    results = MetricLog(reduce)
    for value in (1.0, 3.0):
        log(results, "validation_step", "m", value, sync_dist=True, reduce_fx=reduce_fx)
    _, logged, _ = results.epoch_metrics()
    local = {"sum": 4.0, "max": 3.0, "min": 1.0}[reduce_fx]
    assert reduce.calls == [(local, reduce_fx)]
    assert float(logged["m"]) == pytest.approx(2 * local)


def test_sync_dist_step_value_is_reduced_at_log_time():
    reduce = FakeAllReduce(lambda tensor, op: tensor + 10)
    results = MetricLog(reduce)
    results.batch = torch.zeros(2)
    value = torch.tensor(1.5)
    log(results, "training_step", "loss", value, sync_dist=True)
    assert reduce.calls == [(1.5, "mean")]
    assert float(value) == 1.5  # the user's tensor is not reduced in place
    _, logged, _ = results.step_metrics()
    assert floats(logged) == {"loss": 11.5}


def test_forked_sync_dist_reduces_step_and_epoch_values():
    reduce = FakeAllReduce(lambda tensor, op: tensor * 2)
    results = MetricLog(reduce)
    results.batch = torch.zeros(4)
    log(results, "training_step", "loss", 3.0, on_step=True, on_epoch=True, sync_dist=True)
    _, step_logged, _ = results.step_metrics()
    _, epoch_logged, _ = results.epoch_metrics()
    assert floats(step_logged) == {"loss_step": 6.0}
    assert floats(epoch_logged) == {"loss_epoch": 3.0}  # (2 * 12) / (2 * 4)
    assert sorted(reduce.calls) == [(3.0, "mean"), (4.0, "sum"), (12.0, "sum")]


def test_no_all_reduce_without_sync_dist():
    reduce = FakeAllReduce()
    results = MetricLog(reduce)
    results.batch = torch.zeros(2)
    log(results, "training_step", "loss", 1.0, on_epoch=True)
    log(results, "validation_step", "val", 1.0, reduce_fx="max")
    results.step_metrics()
    results.epoch_metrics()
    assert reduce.calls == []


def test_to_floats():
    assert to_floats({"a": torch.tensor(1.5), "b": torch.tensor(2)}) == {"a": 1.5, "b": 2.0}
