"""Optimizer moments are known zero without reading them, and only while that is true.

`make_resident` fills all-zero states on the GPU instead of uploading them. Moments the
optimizer creates are marked zero (`runtime.step.mark_zero`) so that their bytes are never
scanned; a wrong mark would silently corrupt training, so these tests write moments every way
a user can after creation and check the values the step computes with.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from alpha_jit import nn
from alpha_jit.runtime import step as step_mod
from alpha_jit.runtime.step import known_zero, make_resident, mark_zero
from alpha_jit.tensor import StateTensor
from tests.e2e.util import regression_step

LR, WD, B1, B2, EPS = 0.05, 0.1, 0.9, 0.999, 1e-8


def test_a_marked_array_is_read_only_and_only_that_array_is_known_zero():
    a = np.zeros((4, 5), np.float32)
    mark_zero(a)
    assert known_zero(a) and not a.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        a[0, 0] = 1.0  # an in-place write cannot make the mark a lie
    assert not known_zero(a.copy()) and not known_zero(a.reshape(-1)) and not known_zero(None)
    a.flags.writeable = True  # made writable again: no longer trusted
    assert not known_zero(a)
    view = np.zeros(8, np.float32)[2:6]
    mark_zero(view)  # a view's base could be written through: not marked
    assert not known_zero(view) and view.flags.writeable


def test_the_mark_goes_with_its_array():
    a = np.zeros(16, np.float32)
    mark_zero(a)
    key = id(a)
    assert key in step_mod._KNOWN_ZERO
    del a
    gc.collect()
    assert key not in step_mod._KNOWN_ZERO


def test_fresh_moments_are_filled_without_a_scan(device, monkeypatch):
    model = nn.Linear(4, 3)
    opt = nn.optim.AdamW(model.parameters())
    moments = [t for per_p in opt.state.values() for t in per_p.values()]
    assert moments and all(known_zero(t._host) for t in moments)
    scanned = []
    scan = step_mod._all_zero_bits
    monkeypatch.setattr(step_mod, "_all_zero_bits", lambda a: scanned.append(a) or scan(a))
    uploads = device.stats["uploads"]
    make_resident(device, moments)
    assert not scanned and device.stats["uploads"] == uploads
    for t in moments:
        np.testing.assert_array_equal(t.numpy(), np.zeros(t.shape, np.float32))


def test_a_marked_moment_written_in_place_after_unlocking_is_uploaded(device):
    opt = nn.optim.AdamW(nn.Linear(4, 3).parameters())
    m = opt.state[opt.params[0]]["exp_avg"]
    m._host.flags.writeable = True  # the only way to write a marked array in place
    m._host[1, 2] = 3.5
    make_resident(device, [m])
    want = np.zeros(m.shape, np.float32)
    want[1, 2] = 3.5
    np.testing.assert_array_equal(m.numpy(), want)


def test_a_state_that_is_zero_but_unmarked_is_still_found_by_its_bytes(device):
    h = StateTensor(np.zeros((8, 8), np.float32), "z")
    assert not known_zero(h._host)
    uploads = device.stats["uploads"]
    make_resident(device, [h])
    assert device.stats["uploads"] == uploads  # filled, as before the mark existed
    assert not h.numpy().any()


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((5, 4)).astype(np.float32),
            rng.standard_normal((5, 3)).astype(np.float32))


def _reference(w, b, m, v, t, x, y):
    """One AdamW update (PyTorch's formulas) of y ~ x @ w.T + b under the mean squared error;
    m, v: {"w": ..., "b": ...} moments before it, t: the update's number (1-based)."""
    d = 2.0 * (x @ w.T + b - y) / y.size
    grads = {"w": d.T @ x, "b": d.sum(0)}
    out = {}
    for k, p in (("w", w), ("b", b)):
        g = grads[k].astype(np.float64)
        mk = B1 * m[k] + (1 - B1) * g
        vk = B2 * v[k] + (1 - B2) * g * g
        denom = np.sqrt(vk) / np.sqrt(1 - B2 ** t) + EPS
        out[k] = (p * (1 - LR * WD) - LR / (1 - B1 ** t) * mk / denom, mk, vk)
    return out


@pytest.mark.parametrize("how", ["load_state_dict", "assign"])
def test_moments_written_after_creation_reach_the_step(how):
    nn.manual_seed(1)
    model = nn.Linear(4, 3)
    opt = nn.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    rng = np.random.default_rng(7)
    w, b = model.weight.numpy(), model.bias.numpy()
    m = {"w": rng.standard_normal(w.shape).astype(np.float32),
         "b": rng.standard_normal(b.shape).astype(np.float32)}
    v = {k: (rng.random(a.shape) + 0.5).astype(np.float32) for k, a in m.items()}
    if how == "load_state_dict":
        sd = {"state": {i: {"step": 3.0, "exp_avg": m[k], "exp_avg_sq": v[k]}
                        for i, k in enumerate("wb")},
              "param_groups": [{**opt.param_groups[0], "params": [0, 1]}]}
        opt.load_state_dict(sd)
        t = 4
    else:
        for p, k in zip(opt.params, "wb", strict=True):
            opt.state[p]["exp_avg"].assign(m[k])
            opt.state[p]["exp_avg_sq"].assign(v[k])
        t = 1
    step = regression_step(model, opt)
    x, y = _data()
    float(step(x, y))
    want = _reference(w.astype(np.float64), b.astype(np.float64),
                      {k: a.astype(np.float64) for k, a in m.items()},
                      {k: a.astype(np.float64) for k, a in v.items()}, t, x, y)
    for p, k in zip(opt.params, "wb", strict=True):
        new_p, new_m, new_v = want[k]
        np.testing.assert_allclose(p.numpy(), new_p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), new_m, rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].numpy(), new_v, rtol=1e-5,
                                   atol=1e-6)
    # the zero-moment run differs: the loaded moments were used, not zero-filled
    assert np.abs(want["w"][0] - _reference(w, b, {"w": 0, "b": 0}, {"w": 0, "b": 0}, t, x,
                                            y)["w"][0]).max() > 1e-3


def test_fresh_moments_step_like_the_reference():
    nn.manual_seed(2)
    model = nn.Linear(4, 3)
    opt = nn.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    w, b = model.weight.numpy().astype(np.float64), model.bias.numpy().astype(np.float64)
    step = regression_step(model, opt)
    x, y = _data(3)
    float(step(x, y))
    zero = {"w": np.zeros_like(w), "b": np.zeros_like(b)}
    want = _reference(w, b, zero, zero, 1, x, y)
    for p, k in zip(opt.params, "wb", strict=True):
        np.testing.assert_allclose(p.numpy(), want[k][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), want[k][1], rtol=1e-5,
                                   atol=1e-6)
