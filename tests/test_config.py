"""Trainer flag checking and resolution (``make_config`` / ``make_scaling``), through ``Trainer(...)``.

Constructing a Trainer checks and resolves every flag but starts no Ray.
"""

import warnings

import pytest

import raylight
from raylight.shared.config import MisconfigurationException, make_scaling

# ---- out-of-range flags ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"max_epochs": -2}, "max_epochs"),
        ({"max_steps": -2}, "max_steps"),
        ({"min_epochs": -1}, "min_epochs"),
        ({"limit_train_batches": 1.5}, "limit_train_batches"),
        ({"limit_train_batches": -1}, "limit_train_batches"),
        ({"limit_val_batches": -0.1}, "limit_val_batches"),
        ({"limit_test_batches": 2.0}, "limit_test_batches"),
        ({"limit_predict_batches": -3}, "limit_predict_batches"),
        ({"val_check_interval": 0.0}, "val_check_interval"),
        ({"val_check_interval": 1.5}, "val_check_interval"),
        ({"val_check_interval": 0}, "val_check_interval"),
        ({"check_val_every_n_epoch": 0}, "check_val_every_n_epoch"),
        ({"num_sanity_val_steps": -2}, "num_sanity_val_steps"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
        ({"log_every_n_steps": -1}, "log_every_n_steps"),  # 0 is Lightning's "no step rows"
        ({"gradient_clip_val": -1}, "gradient_clip_val"),
        ({"gradient_clip_algorithm": "foo"}, "gradient_clip_algorithm"),
        ({"precision": "64"}, "precision"),
        ({"precision": "16-mixed"}, "16-mixed"),  # needs GPUs
        ({"fast_dev_run": -1}, "fast_dev_run"),
        ({"num_workers": 0}, "num_workers"),
        ({"num_workers": -1}, "num_workers"),
        ({"accelerator": "tpu"}, "accelerator"),
        ({"devices": 0}, "devices"),
        ({"num_nodes": 0}, "num_nodes"),
        ({"strategy": "deepspeed"}, "strategy"),
        ({"resources_per_worker": {"CPU": -1}}, "resources_per_worker"),
        ({"accelerator": "gpu", "use_gpu": False}, "use_gpu"),
    ],
)
def test_out_of_range_flag_raises_naming_the_flag(flags, named):
    with pytest.raises(MisconfigurationException, match=named):
        raylight.Trainer(**flags)


@pytest.mark.parametrize(
    ("flags", "takes"),
    [
        ({"devices": "x"}, "a number of devices"),
        ({"devices": "0,x"}, "a list of"),
        ({"devices": []}, "a list of"),
        ({"devices": 1.5}, "a number of devices"),
        ({"devices": True}, "a number of devices"),
        ({"val_check_interval": "x"}, "a number of batches"),
        ({"fast_dev_run": "x"}, "an int >= 0"),
        ({"max_epochs": "3"}, "an int >= 0"),
        ({"default_root_dir": 5}, "a path or a storage URI"),
        ({"process_group_timeout_s": "60"}, "seconds > 0"),
        ({"process_group_timeout_s": 0}, "seconds > 0"),
        ({"placement_timeout_s": -1}, "seconds > 0"),
        ({"elastic_check_interval": None}, "seconds >= 0"),
        ({"elastic_check_interval": -1}, "seconds >= 0"),
        ({"max_failures": "3"}, "-1 (retry without limit)"),
        ({"max_failures": -2}, "-1 (retry without limit)"),
        ({"recovery_every_n_train_steps": 0}, "an int >= 1"),
        ({"recovery_train_time_interval": 60}, "a datetime.timedelta"),
        ({"ray_init_kwargs": ["num_cpus", 2]}, "a dict of ray.init arguments"),
        ({"resources_per_worker": ["CPU"]}, "a dict of Ray resources"),
        ({"use_gpu": "yes"}, "True or False"),
        ({"callbacks": 5}, "a Callback or a list"),
    ],
)
def test_a_bad_flag_value_names_the_flag_and_what_it_takes(flags, takes):
    """Every flag error says ``Trainer(flag=value)`` and the values the flag takes, never a
    bare ``invalid literal for int()`` from deep inside."""
    ((name, value),) = flags.items()
    with pytest.raises(MisconfigurationException) as info:
        raylight.Trainer(**flags)
    message = str(info.value)
    assert f"Trainer({name}={value!r})" in message
    assert takes in message


def test_an_elastic_check_at_every_epoch_end_is_allowed():
    assert raylight.Trainer(elastic_check_interval=0).elastic_check_interval == 0


def test_misconfiguration_is_a_value_error():
    with pytest.raises(ValueError):
        raylight.Trainer(max_epochs=-2)


@pytest.mark.parametrize(
    "flags",
    [
        {"num_workers": 3, "devices": 2},
        {"num_workers": 2, "devices": 2, "num_nodes": 2},
        {"num_workers": 1, "accelerator": "gpu", "devices": 2},
    ],
)
def test_devices_that_disagree_with_num_workers_raise(flags):
    with pytest.raises(MisconfigurationException) as info:
        raylight.Trainer(**flags)
    message = str(info.value)
    assert "num_workers" in message
    assert "devices" in message


def test_devices_that_agree_with_num_workers_are_accepted():
    trainer = raylight.Trainer(num_workers=4, devices=2, num_nodes=2)
    assert trainer.num_workers == 4
    assert trainer.world_size == 4


# ---- Lightning defaults ---------------------------------------------------------------------------


def test_defaults_are_lightnings():
    trainer = raylight.Trainer()
    config = trainer.config
    assert trainer.max_epochs == 1000
    assert trainer.max_steps == -1
    assert config.min_epochs == 0
    for name in ("train", "val", "test", "predict"):
        value = getattr(config, f"limit_{name}_batches")
        assert value == 1.0 and isinstance(value, float), name
    assert config.val_check_interval == 1.0
    assert config.check_val_every_n_epoch == 1
    assert config.num_sanity_val_steps == 2
    assert config.accumulate_grad_batches == 1
    assert config.gradient_clip_val is None
    assert config.precision == "32-true"
    assert config.log_every_n_steps == 50
    assert config.fast_dev_run == 0
    assert trainer.num_workers == 1
    assert trainer.scaling.use_gpu is False


def test_max_epochs_none_with_max_steps_means_unlimited_epochs():
    trainer = raylight.Trainer(max_steps=10)
    assert trainer.max_steps == 10
    # Lightning resolves max_epochs=None with max_steps set to -1 (no epoch limit):
    # any epoch count a run could reach must stay below the limit.
    assert trainer.config.max_epochs >= 2**31 - 1
    assert trainer.config.max_epochs == raylight.Trainer(max_epochs=-1).config.max_epochs


def test_explicit_max_epochs_with_max_steps_is_kept():
    trainer = raylight.Trainer(max_epochs=3, max_steps=10)
    assert (trainer.max_epochs, trainer.max_steps) == (3, 10)


def test_max_epochs_zero_is_allowed():
    assert raylight.Trainer(max_epochs=0).max_epochs == 0


@pytest.mark.parametrize(
    ("precision", "resolved"),
    [
        (32, "32-true"),
        ("32", "32-true"),
        ("32-true", "32-true"),
        ("bf16", "bf16-mixed"),
        ("bf16-mixed", "bf16-mixed"),
    ],
)
def test_precision_aliases_resolve(precision, resolved):
    assert raylight.Trainer(precision=precision).config.precision == resolved


def test_sixteen_mixed_is_accepted_with_gpus():
    trainer = raylight.Trainer(precision=16, use_gpu=True)
    assert trainer.config.precision == "16-mixed"


def test_int_and_float_limits_are_kept_apart():
    config = raylight.Trainer(limit_train_batches=1, limit_val_batches=0.25).config
    assert config.limit_train_batches == 1 and isinstance(config.limit_train_batches, int)
    assert config.limit_val_batches == 0.25


# ---- fast_dev_run ---------------------------------------------------------------------------------


def test_fast_dev_run_true_runs_one_batch_of_everything():
    config = raylight.Trainer(fast_dev_run=True, max_epochs=7, num_sanity_val_steps=5).config
    assert config.fast_dev_run == 1
    for name in ("train", "val", "test", "predict"):
        value = getattr(config, f"limit_{name}_batches")
        # an int 1 means one batch; the float 1.0 would mean the whole loader
        assert value == 1 and isinstance(value, int), name
    assert config.max_steps == 1
    assert config.max_epochs == 1
    assert config.num_sanity_val_steps == 0
    assert config.val_check_interval == 1.0
    assert config.check_val_every_n_epoch == 1


def test_fast_dev_run_n_runs_n_batches():
    config = raylight.Trainer(fast_dev_run=3, limit_train_batches=0.5).config
    assert config.fast_dev_run == 3
    assert config.limit_train_batches == 3 and isinstance(config.limit_train_batches, int)
    assert config.limit_val_batches == 3
    assert config.max_steps == 3
    assert config.num_sanity_val_steps == 0


def test_fast_dev_run_false_changes_nothing():
    config = raylight.Trainer(fast_dev_run=False, limit_train_batches=0.5, max_steps=20).config
    assert config.fast_dev_run == 0
    assert config.limit_train_batches == 0.5
    assert config.max_steps == 20
    assert config.num_sanity_val_steps == 2


# ---- scaling ---------------------------------------------------------------------------------------


def test_gpus_is_deprecated_and_means_gpu_workers():
    with pytest.warns(DeprecationWarning, match="gpus"):
        trainer = raylight.Trainer(gpus=2)
    assert trainer.num_workers == 2
    assert trainer.scaling.use_gpu is True
    assert trainer.scaling.bundle() == {"CPU": 1.0, "GPU": 1.0}


def test_gpus_zero_means_cpu_workers():
    with pytest.warns(DeprecationWarning):
        trainer = raylight.Trainer(gpus=0, num_workers=3)
    assert trainer.num_workers == 3
    assert trainer.scaling.use_gpu is False


def test_no_deprecation_warning_without_gpus():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        raylight.Trainer(num_workers=2)


def test_accelerator_gpu_devices_times_nodes_gives_gpu_workers():
    trainer = raylight.Trainer(accelerator="gpu", devices=2, num_nodes=2)
    assert trainer.num_workers == 4
    assert trainer.scaling.use_gpu is True
    assert trainer.scaling.bundle() == {"CPU": 1.0, "GPU": 1.0}


def test_accelerator_cuda_is_gpu():
    trainer = raylight.Trainer(accelerator="cuda", devices=1)
    assert trainer.scaling.use_gpu is True
    assert trainer.num_workers == 1


def test_devices_list_counts_devices():
    trainer = raylight.Trainer(accelerator="gpu", devices=[0, 1, 2])
    assert trainer.num_workers == 3


def test_devices_int_string_is_a_count():
    assert raylight.Trainer(accelerator="cpu", devices="3").num_workers == 3


def test_devices_comma_string_is_a_list_of_gpu_ids():
    # Lightning parses devices="0,1" for GPUs as the device ids [0, 1]: two devices.
    trainer = raylight.Trainer(accelerator="gpu", devices="0,1")
    assert trainer.num_workers == 2
    assert trainer.scaling.use_gpu is True


@pytest.mark.parametrize("devices", ["auto", -1, None])
def test_auto_devices_defer_to_num_workers(devices):
    trainer = raylight.Trainer(num_workers=3, devices=devices)
    assert trainer.num_workers == 3


def test_ray_spelling():
    trainer = raylight.Trainer(num_workers=3, use_gpu=True)
    assert trainer.num_workers == 3
    assert trainer.scaling.use_gpu is True


def test_cpu_workers_by_default_ask_one_cpu():
    scaling = raylight.Trainer(num_workers=2).scaling
    assert scaling.use_gpu is False
    assert scaling.cpus_per_worker == 1
    assert scaling.bundle() == {"CPU": 1.0}


def test_resources_per_worker_cpu():
    scaling = raylight.Trainer(resources_per_worker={"CPU": 2}).scaling
    assert scaling.cpus_per_worker == 2
    assert scaling.bundle() == {"CPU": 2.0}
    assert isinstance(scaling.bundle()["CPU"], float)
    assert scaling.use_gpu is False


def test_resources_per_worker_gpu_implies_use_gpu():
    scaling = raylight.Trainer(resources_per_worker={"CPU": 4, "GPU": 0.5}).scaling
    assert scaling.use_gpu is True
    assert scaling.cpus_per_worker == 4
    assert scaling.bundle() == {"CPU": 4.0, "GPU": 0.5}


def test_bundle_does_not_mutate_resources():
    scaling = make_scaling(2, True, {"memory": 100}, None, None, 1, None)
    assert scaling.bundle() == {"memory": 100.0, "CPU": 1.0, "GPU": 1.0}
    assert scaling.resources_per_worker == {"memory": 100.0}


def test_make_scaling_direct_lightning_spelling():
    scaling = make_scaling(None, None, None, "gpu", 2, 3, None)
    assert scaling.num_workers == 6
    assert scaling.use_gpu is True
