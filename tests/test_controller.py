"""The failure policy on its own: what is retried, how often, and the size of the next group."""

from __future__ import annotations

import pytest
import ray
import torch.distributed as dist

from raylight.driver.controller import Controller, FailureLimitExceeded, is_system_failure
from raylight.driver.group import WorkerFailure


def test_system_failures_are_retried_and_user_errors_are_not():
    assert is_system_failure(WorkerFailure("rank 1 died", 1))
    assert is_system_failure(ray.exceptions.ActorDiedError())
    assert is_system_failure(dist.DistNetworkError("store down"))
    assert is_system_failure(RuntimeError("[gloo/transport/tcp/pair.cc] Connection closed by peer"))
    assert not is_system_failure(ValueError("bad shape in training_step"))
    assert not is_system_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_system_failure(KeyboardInterrupt())


def test_a_user_error_is_raised_at_once_and_not_counted():
    controller = Controller(max_failures=5)
    with pytest.raises(ValueError, match="bad"):
        controller.failed(ValueError("bad"))
    assert controller.failures == []


def test_the_limit_names_every_failure():
    controller = Controller(max_failures=2)
    controller.failed(WorkerFailure("rank 1 died during epoch 0", 1))
    controller.failed(WorkerFailure("rank 0 died during epoch 3", 0))
    with pytest.raises(FailureLimitExceeded) as info:
        controller.failed(ray.exceptions.ActorDiedError())
    message = str(info.value)
    assert "failed 3 times" in message and "max_failures=2" in message
    assert "1. WorkerFailure: rank 1 died during epoch 0" in message
    assert "2. WorkerFailure: rank 0 died during epoch 3" in message
    assert "3. ActorDiedError" in message


def test_without_retries_the_failure_itself_surfaces():
    controller = Controller(max_failures=0)
    with pytest.raises(WorkerFailure, match="rank 1 died"):
        controller.failed(WorkerFailure("rank 1 died", 1))


def test_unlimited_retries():
    controller = Controller(max_failures=-1)
    for _ in range(50):
        controller.failed(WorkerFailure("rank 0 died", 0))
    assert len(controller.failures) == 50
