"""A replayed call's host work, counted instead of timed: one driver call, nothing per state.

Wall time of the host path varies by a factor of 2-4 between runs of the same code on the H200
machines, so a host-overhead regression is judged here by what a replayed call does with the GPU
idle: the Vulkan functions it calls (only vkQueueSubmit: no wait, no query, no allocation, no
upload) and the Python it runs, which must not grow with the number of parameters and
optimizer moments (GPT-2 has about 450 state buffers: a per-call loop over them would show).
"""

from __future__ import annotations

import collections
import sys

import numpy as np

from alpha_jit import nn
from alpha_jit.runtime import vk
from tests.e2e.util import classifier_step


def _replayed(depth: int):
    """A classifier step of `depth` hidden Linears (AdamW: 2 moments per parameter), compiled
    and replayed until the cheap path is taken; returns (step, x, y, executable)."""
    nn.manual_seed(0)
    layers = [nn.Linear(4, 8), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(8, 3))
    opt = nn.optim.AdamW(model.parameters(), lr=1e-2)
    step = classifier_step(model, opt)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 4)).astype(np.float32), rng.integers(0, 3, 16, np.int32)
    for _ in range(3):  # both staging slots used, guards cached at this epoch
        float(step(x, y))
    exe = next(e for es in step.cache.values() for e in es)
    return step, x, y, exe


def _vulkan_calls(step, x, y) -> collections.Counter:
    real = vk.lib()
    seen: collections.Counter = collections.Counter()

    class Spy:
        def __getattr__(self, name):
            seen[name] += 1
            return getattr(real, name)

    orig = vk.lib
    vk.lib = lambda: Spy()
    try:
        handle = step(x, y)
    finally:
        vk.lib = orig
    float(handle)
    return seen


def _python_events(step, x, y) -> int:
    """Python lines run plus Python and C functions called by one replayed call."""
    events = 0

    def lines(frame, event, arg):
        nonlocal events
        events += 1
        return lines

    def calls(frame, event, arg):
        nonlocal events
        events += event == "c_call"

    sys.settrace(lines)
    sys.setprofile(calls)
    try:
        handle = step(x, y)
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    float(handle)
    return events


def test_a_replayed_call_on_an_idle_gpu_only_submits():
    step, x, y, exe = _replayed(1)
    stats = dict(exe.device.stats)
    assert _vulkan_calls(step, x, y) == {"vkQueueSubmit": 1}
    after = exe.device.stats
    assert {k: after[k] - stats[k] for k in stats if after[k] != stats[k]} == {"submits": 1}
    assert step.traces == 1 and not exe.device.memory.deferred


def test_a_replayed_call_does_the_same_python_work_for_12_or_48_state_buffers():
    counted = {}
    for depth in (1, 7):
        # measured before the next model is built: building one writes guarded attributes,
        # and the first call after such a write re-reads its guards once
        step, x, y, exe = _replayed(depth)
        counted[len(exe.states)] = _python_events(step, x, y)
    assert list(counted) == [12, 48]  # parameters and their two AdamW moments
    assert counted[12] == counted[48]
