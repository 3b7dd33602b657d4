"""State written back in place: the kernel that computes a state's new value from it writes
into the state's own memory when it is the state's last reader (plan.py: `_state_aliases`).

Why tested here: the plan decides it, and a wrong decision is a silently wrong parameter (a
later kernel reading the overwritten old value, a missing barrier before the overwrite). So
the optimizer's updates are checked to be in place (no arena memory, no end-of-step copy) and
numerically the same as the reference, and programs that read a state around its update see
the old value where they should.
"""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.runtime.executor import CopyCmd
from tests.e2e.util import regression_step
from tests.runtime.test_zero_states import B1, B2, EPS, LR, WD, _data, _reference


def _executable(step):
    return next(e for es in step.cache.values() for e in es)


def test_the_optimizer_updates_parameters_and_moments_in_place():
    nn.manual_seed(3)
    model = nn.Linear(4, 3)
    opt = nn.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    w, b = model.weight.numpy().astype(np.float64), model.bias.numpy().astype(np.float64)
    m = {"w": np.zeros_like(w), "b": np.zeros_like(b)}
    v = {"w": np.zeros_like(w), "b": np.zeros_like(b)}
    step = regression_step(model, opt)
    for t in (1, 2, 3):
        x, y = _data(t)
        float(step(x, y))
        want = _reference(w, b, m, v, t, x, y)
        (w, m["w"], v["w"]), (b, m["b"], v["b"]) = want["w"], want["b"]
    for p, k in zip(opt.params, "wb", strict=True):
        np.testing.assert_allclose(p.numpy(), want[k][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), want[k][1], rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].numpy(), want[k][2],
                                   rtol=1e-5, atol=1e-6)
    exe = _executable(step)
    low, mem = exe.lowered, exe.mem
    # weight, bias and their two moments (the step count is a host scalar)
    assert set(mem.state_alias) == set(low.state_writes.values()) and len(mem.state_alias) == 6
    assert not set(mem.state_alias) & set(mem.offsets)  # no arena memory for them
    states = {st.region for st in exe.states.values()}
    copies = [c for c in exe._commands() if isinstance(c, CopyCmd)]
    assert not [c for c in copies if c.dst in states]  # no copy back at the end


@pytest.mark.parametrize("read_after", [False, True])
def test_a_state_read_around_its_update_sees_the_right_values(read_after):
    p0 = np.arange(64, dtype=np.float32) / 7.0
    p = nn.Parameter(p0.copy(), requires_grad=False)

    @aj.compile
    def f(x):
        grid = p.reshape(8, 8)  # a view of the state (read as it was, by a later kernel)
        before = p.sum()
        p.assign(p * 0.5 + x)
        after = p.sum()
        # read_after: the old value's column sums come after the update kernel
        return before, after, *([grid.sum(axis=0)] if read_after else [])

    want = p0.astype(np.float64)
    for i in range(3):
        x = np.full(64, i + 1.0, np.float32)
        got = [np.asarray(r) for r in f(x)]
        new = want * 0.5 + x
        np.testing.assert_allclose(got[0], want.sum(), rtol=1e-6)
        np.testing.assert_allclose(got[1], new.sum(), rtol=1e-6)
        if read_after:
            np.testing.assert_allclose(got[2], want.reshape(8, 8).sum(axis=0), rtol=1e-6)
        want = new
    np.testing.assert_allclose(p.numpy(), want, rtol=1e-6)
    exe = _executable(f)
    update = next(i for i, k in enumerate(exe.lowered.kernels) if k.spec.family == "elementwise")
    # a later reader keeps the old value in its own memory; else the update overwrites it,
    # after a barrier behind the reduction that read it
    assert bool(exe.mem.state_alias) is not read_after
    assert read_after or exe.plan.barriers[update]


@pytest.mark.parametrize("order", ["shadow first", "shadow last"])
def test_one_value_written_back_to_two_states_reaches_both(order):
    p = nn.Parameter(np.arange(8, dtype=np.float32), requires_grad=False)
    shadow = nn.Parameter(np.zeros(8, np.float32), requires_grad=False)  # written, never read

    @aj.compile
    def f(x):
        new = p * 0.5 + x
        for s in ((shadow, p) if order == "shadow first" else (p, shadow)):
            s.assign(new)
        return x.sum()

    want = np.arange(8, dtype=np.float64)
    for i in range(2):
        x = np.full(8, i + 1.0, np.float32)
        float(f(x))
        want = want * 0.5 + x
        np.testing.assert_allclose(p.numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(shadow.numpy(), want, rtol=1e-6)
    assert _executable(f).mem.state_alias  # p in place, shadow copied from p's memory


def test_a_state_returned_as_it_was_is_the_old_value():
    q0 = np.linspace(0, 1, 64, dtype=np.float32)
    q = nn.Parameter(q0.copy(), requires_grad=False)

    @aj.compile
    def f(x):
        old = q.reshape(8, 8)
        q.assign(q * 0.5 + x)
        return old, q

    x = np.ones(64, np.float32)
    old, new = (np.asarray(r) for r in f(x))
    np.testing.assert_array_equal(old, q0.reshape(8, 8))
    np.testing.assert_allclose(new, q0 * 0.5 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(q.numpy(), q0 * 0.5 + 1.0, rtol=1e-6)
