"""A step's build that fails (the driver's pipelines, the arena's allocation, a state upload)
raises that error and keeps no device memory.
"""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit.errors import AlphaJitError
from alpha_jit.runtime import pipelines, step


def _fn():
    @aj.compile
    def f(x):
        return (x * 2.0 + 1.0).sum()

    return f


def _in_use(device) -> int:
    device.synchronize()
    device.completed_value()  # deferred frees whose submit has passed
    return device.memory.bytes_in_use()


def test_the_arena_is_ready_when_the_step_runs(device):
    x = np.arange(1000, dtype=np.float32)
    assert float(_fn()(x)) == pytest.approx(float((x * 2 + 1).sum()))


@pytest.mark.parametrize("owner,name,message", [
    (pipelines.BuildProgress, "pipelines", "the driver refused a pipeline (a test)"),
    (step.Executable, "_alloc_pools", "out of device memory (a test)"),
])
def test_a_failure_on_either_side_is_the_builds_error_and_frees_the_arena(
        device, monkeypatch, owner, name, message):
    before = _in_use(device)

    def fail(*args):
        raise AlphaJitError(message)

    monkeypatch.setattr(owner, name, fail)
    with pytest.raises(AlphaJitError, match=message.split(" (")[0]):
        _fn()(np.ones(4096, np.float32))
    assert _in_use(device) == before


def test_a_failed_upload_keeps_no_state_memory(device, monkeypatch):
    # a Ctrl-C or a device error mid-upload: the states' regions are freed, not held for good
    from alpha_jit import nn

    params = [nn.Parameter(np.full((300, 70), i + 1.0, np.float32)) for i in range(3)]
    before = _in_use(device)

    def fail(self, items):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(device), "upload_many", fail)
    with pytest.raises(KeyboardInterrupt):
        step.make_resident(device, params)
    assert _in_use(device) == before and all(p._device is None for p in params)
    monkeypatch.undo()
    step.make_resident(device, params)  # the retry uploads them
    assert all(np.array_equal(p.numpy(), np.full((300, 70), i + 1.0)) for i, p in
               enumerate(params))
