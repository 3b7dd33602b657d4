"""The replayed call's host path: guards checked in O(1), yet every guarded write retraces.

A compiled call re-checks the Python state its trace read (`alpha_jit.guards`): after the
first check it trusts one epoch counter that every write of a guarded attribute advances.
These tests check that each way a user changes such state still retraces after the cheap
path was taken, that a guard outside the tracked attributes is checked in full, and that
the host work of a replayed call does not grow with the model (it was a loop over every
parameter, moment and guard: ~600 states and ~400 guards for GPT-2).
"""

from __future__ import annotations

import collections
import sys

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import dtypes, guards, nn
from alpha_jit.errors import AlphaJitError
from alpha_jit.ir import trace
from alpha_jit.nn.transformer import GPT, GPTConfig
from alpha_jit.runtime import vk
from alpha_jit.tensor import Tensor
from benchmarks import training
from tests.e2e.util import classifier_step


def _model_and_step():
    nn.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.ReLU(), nn.Linear(8, 3))
    opt = nn.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, classifier_step(model, opt)


def _set_requires_grad(model, opt):
    model[0].weight.requires_grad = False  # a plain assignment, not requires_grad_()


def _set_training_attribute(model, opt):
    model[1].training = False


def _set_private_training(model, opt):
    model[1]._training = False


def _replace_a_parameter(model, opt):
    # frozen: outside the optimizer, a trainable one would keep its .grad (one more trace)
    model[3].bias = nn.Parameter(np.ones(3, np.float32), requires_grad=False)


def _load_optimizer_state(model, opt):
    opt.load_state_dict(opt.state_dict())


def _delete_requires_grad(model, opt):
    w = model[0].weight
    w.requires_grad = False
    float(_STEP[0](*_XY))  # retraced frozen, then cached at this epoch
    del w.requires_grad  # back to the class default (True)


def _class_level_requires_grad(model, opt):
    nn.Parameter.requires_grad = False  # every parameter without a value of its own


_STEP: list = []
_XY: tuple = ()


@pytest.mark.parametrize("change", [_set_requires_grad, _set_training_attribute,
                                    _set_private_training, _replace_a_parameter,
                                    _load_optimizer_state, _delete_requires_grad,
                                    _class_level_requires_grad])
def test_every_guarded_write_retraces_after_the_cheap_check(change):
    model, opt, step = _model_and_step()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 4)).astype(np.float32), rng.integers(0, 3, 16, np.int32)
    _STEP[:], globals()["_XY"] = [step], (x, y)
    float(step(x, y))
    float(step(x, y))  # guards held at this epoch: the next call takes the cheap path
    float(step(x, y))
    assert step.traces == 1
    try:
        change(model, opt)
        before = step.traces
        w0 = model[0].weight.numpy()
        float(step(x, y))
        # back to the first trace's state: its cached step is valid again, else a new trace
        assert step.traces == before + (change is not _delete_requires_grad), change.__name__
        trained = bool(np.abs(model[0].weight.numpy() - w0).max() > 0)
        assert trained == bool(model[0].weight.requires_grad), change.__name__
        float(step(x, y))
        assert step.traces == before + (change is not _delete_requires_grad)  # once only
    finally:
        if "requires_grad" in vars(nn.Parameter) and nn.Parameter.requires_grad is False:
            nn.Parameter.requires_grad = True


def test_unchanged_writes_keep_the_cheap_check_and_failures_are_cached_too():
    model, opt, step = _model_and_step()
    epoch = guards.EPOCH.value
    model.train()  # already training: a PyTorch habit every iteration, no change
    opt.zero_grad()  # no kept gradients: nothing changes
    model[0].weight.requires_grad = True
    assert guards.EPOCH.value == epoch
    obj = _Tracked()
    stale = guards.GuardSet([(obj, "version", 5)], [])
    assert not stale.holds()
    obj.version = 0  # the same value: no bump, the failed answer stays cached
    assert guards.EPOCH.value == epoch and stale._at == epoch and not stale._result


class _Plain:
    flag = 1


class _Tracked(guards.GuardedAttrs):
    _guarded = frozenset({"version"})
    version = 0


def test_a_guard_outside_the_tracked_attributes_is_checked_in_full_every_call():
    obj = _Plain()
    gs = guards.GuardSet([(obj, "flag", 1)], [])
    assert gs.holds() and gs.holds()
    obj.flag = 2  # no epoch bump: only a full check sees it
    assert not gs.holds()
    assert "flag changed from 1 to 2" in gs.change()


def test_a_tracked_guard_trusts_the_epoch_until_a_write():
    obj = _Tracked()
    gs = guards.GuardSet([(obj, "version", 0)], [])
    assert gs.holds()
    epoch = guards.EPOCH.value
    obj.version = 1
    assert guards.EPOCH.value == epoch + 1 and not gs.holds()
    obj.version = 0
    assert gs.holds()


def _replayed_gpt_step(n_layer: int):
    """The bench's step (AdamW, clipping) on a tiny GPT, called twice (both staging slots
    recorded, guards cached): (step, x, y)."""
    nn.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    step = training.alpha_step(model, "bf16")
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, 64, (2, 16)).astype(np.int32) for _ in range(2))
    float(step(x, y))
    float(step(x, y))
    return step, x, y


def _host_events_per_replay(n_layer: int) -> int:
    step, x, y = _replayed_gpt_step(n_layer)
    events = 0  # Python lines run and C functions called: a loop over states shows in both

    def lines(frame, event, arg):
        nonlocal events
        events += 1
        return lines

    def c_calls(frame, event, arg):
        nonlocal events
        events += event == "c_call"

    sys.settrace(lines)
    sys.setprofile(c_calls)
    try:
        handle = step(x, y)
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    float(handle)
    assert step.traces == 1
    return events


def test_a_replayed_call_does_the_same_host_work_for_1_or_3_layers():
    assert _host_events_per_replay(1) == _host_events_per_replay(3)


def test_a_replayed_call_on_an_idle_gpu_only_submits():
    # counted, not timed (host wall time varies 2-4x between runs of the same code on the
    # H200 machines): no wait, no query, no allocation, no upload, one vkQueueSubmit
    step, x, y = _replayed_gpt_step(1)
    exe = next(e for es in step.cache.values() for e in es)
    real, seen = vk.lib(), collections.Counter()

    class Spy:
        def __getattr__(self, name):
            seen[name] += 1
            return getattr(real, name)

    stats = dict(exe.device.stats)
    orig = vk.lib
    vk.lib = lambda: Spy()
    try:
        handle = step(x, y)
    finally:
        vk.lib = orig
    float(handle)
    assert seen == {"vkQueueSubmit": 1}
    after = exe.device.stats
    assert {k: after[k] - stats[k] for k in stats if after[k] != stats[k]} == {"submits": 1}
    assert step.traces == 1 and not exe.device.memory.deferred


def test_small_signed_ids_are_range_checked_whatever_the_vocab():
    from alpha_jit.runtime.step import _within

    assert not _within(np.array([1, -1], np.int8), 0, 300)  # -1 wraps to 255 < 300
    assert not _within(np.array([-30000], np.int16), 0, 40000)
    assert _within(np.array([0, 127], np.int8), 0, 300)
    assert not _within(np.array([3, -1], np.int32), 0, 300)


def test_an_empty_input_is_staged():
    @aj.compile
    def f(e, x):
        return aj.cat([e, x]) * 2.0

    out = f(np.zeros(0, np.float32), np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(out.numpy(), [0.0, 2.0, 4.0])


def test_a_spinning_wait_reads_the_same_values_and_the_setting_is_checked(monkeypatch):
    from alpha_jit.errors import AlphaJitError
    from alpha_jit.runtime.device import get_device, wait_spin_s

    dev = get_device()
    monkeypatch.setattr(dev, "_spin_s", 0.05)  # lavapipe does not spin by default
    model, opt, step = _model_and_step()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 4)).astype(np.float32), rng.integers(0, 3, 16, np.int32)
    losses = [float(step(x, y)) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[2] < losses[0]
    assert dev._completed == dev.last_submitted
    monkeypatch.setenv("ALPHA_JIT_WAIT_SPIN_MS", "2.5")
    assert wait_spin_s(dev.caps) == 0.0025
    monkeypatch.setenv("ALPHA_JIT_WAIT_SPIN_MS", "-1")
    with pytest.raises(AlphaJitError, match="ALPHA_JIT_WAIT_SPIN_MS"):
        wait_spin_s(dev.caps)
    monkeypatch.delenv("ALPHA_JIT_WAIT_SPIN_MS")
    assert wait_spin_s(dev.caps) == (0.0 if dev.caps.device_type == "cpu" else 0.1)


class _Scalars:
    """A host-scalar provider (as an optimizer or the RNG is): what each call feeds."""

    def __init__(self):
        self.values: dict = {}

    def next_hparams(self):
        return dict(self.values)


def test_host_scalars_reach_the_step_as_numpy_converts_them():
    # one struct pack per call; a value the pack refuses takes numpy's conversion, as before
    feed = _Scalars()

    @aj.compile
    def f(x):
        ctx = trace.current()
        s = Tensor(ctx.hparam(feed, "s", dtypes.float32), (), dtypes.float32)
        n = Tensor(ctx.hparam(feed, "n", dtypes.int32), (), dtypes.int32)
        return x * s, n + 1

    x = np.arange(1, 5, dtype=np.float32)
    # 0-d and one-element arrays too (a custom provider's), which the pack refuses for i32
    for s, n in [(0.1, 7), (np.float32(2.5), -3), (1e39, 2**31 - 2), (float("nan"), 0),
                 (np.array(0.5), np.array(3.0)), (np.array([1.5]), np.array([4]))]:
        feed.values = {"s": s, "n": n}
        with np.errstate(over="ignore"):  # 1e39 overflows f32 to inf
            want = x * np.asarray(s, np.float32).reshape(())
            out, m = f(x)
        np.testing.assert_array_equal(out.numpy(), want)
        assert int(m.item()) == int(np.asarray(n).reshape(())) + 1
    feed.values = {"s": 1.0, "n": 2**31}  # no int32: refused, as numpy refuses it
    with pytest.raises(OverflowError):
        f(x)
    feed.values = {"s": 1.0, "n": 5}
    assert int(f(x)[1].item()) == 6 and f.traces == 1


def test_inputs_are_cast_and_copied_as_given_and_a_direct_call_is_checked():
    @aj.compile
    def f(a, i):
        return a * 2.0, i + 1

    a = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    i = np.arange(6, dtype=np.int64).reshape(2, 3)
    out, j = f(a, i)  # float64 and int64: cast to f32 and i32 as staging is written
    np.testing.assert_array_equal(out.numpy(), a.astype(np.float32) * np.float32(2))
    np.testing.assert_array_equal(j.numpy(), i + 1)
    t = np.asfortranarray(a)  # not C-contiguous: the same values
    np.testing.assert_array_equal(f(t, i)[0].numpy(), out.numpy())
    assert f.traces == 1
    exe = next(e for es in f.cache.values() for e in es)
    with pytest.raises(AlphaJitError, match=r"compiled for f32\[3, 4\]"):
        exe([a[:, :3].copy(), i])
    with pytest.raises(AlphaJitError, match="compiled for i32"):
        exe([a, i.astype(np.float32)])
    with pytest.raises(AlphaJitError, match=r"1 argument\(s\) given"):
        exe([a])
