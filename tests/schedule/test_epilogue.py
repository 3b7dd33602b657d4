"""GEMM epilogues: bias, GELU, residual adds and casts run in the matmul's store. Values against
numpy and against the same program with the pass off; where the pattern must fire (kernel
families) and where it must not (the GEMM result read through a transpose, a broadcast)."""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit.nn import functional as F
from alpha_jit.runtime.device import get_device
from alpha_jit.runtime.step_plan import plan_step

GELU_C = np.sqrt(2.0 / np.pi)


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x ** 3)))


def _plan(fn, args):
    return plan_step(fn.trace(*args).graph, get_device().caps, progress=False)


def _matmuls(plan):
    """(has an epilogue, acc buffer) per matmul kernel."""
    out = []
    for k in plan.lowered.kernels:
        if k.spec.family == "matmul":
            p = dict(k.spec.params)
            out.append(("epilogue" in p, bool(p.get("acc_buffer"))))
    return out


def _both(make, args, monkeypatch):
    """The program's results with the pass on and with it off, and the two plans."""
    on = make()
    got = on(*args)
    plan_on = _plan(on, args)
    monkeypatch.setenv("ALPHA_JIT_DISABLE_PASSES", "gemm_epilogue")
    off = make()
    ref = off(*args)
    plan_off = _plan(off, args)
    monkeypatch.delenv("ALPHA_JIT_DISABLE_PASSES")
    as_list = (lambda v: [x.numpy() for x in v]) if isinstance(got, tuple | list) else \
        (lambda v: [v.numpy()])
    return as_list(got), as_list(ref), plan_on, plan_off


def _rand(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


# K = 29 fits one chunk of the CPU variant; K = 300 is split over dispatches there (the f32
# accumulator buffer path); M, N are not multiples of any tile.
@pytest.mark.parametrize("cin", [29, 300])
def test_bias_gelu_residual_in_the_store_f32(monkeypatch, cin):
    x, w, b = _rand(3, 37, cin), _rand(45, cin) * 0.2, _rand(45)
    r = _rand(3, 37, 45, seed=1)

    def make():
        @aj.compile
        def f(x, w, b, r):
            h = F.linear(x, w, b)
            return F.gelu(h, approximate="tanh") + r, h

        return f

    got, ref, plan_on, plan_off = _both(make, (x, w, b, r), monkeypatch)
    h = x.astype(np.float64) @ w.T.astype(np.float64) + b
    np.testing.assert_allclose(got[1], h, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[0], gelu(h) + r, rtol=1e-4, atol=1e-4)
    for a, c in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
    assert [e for e, _ in _matmuls(plan_on)] == [True]
    assert [k.family for k in plan_on.kernels] == ["matmul"]  # no elementwise kernel left
    assert "gemm_epilogue" in plan_on.kernels[0].passes
    assert [e for e, _ in _matmuls(plan_off)] == [False]
    assert len(plan_off.kernels) == 2
    cpu_split = get_device().caps.device_type == "cpu" and cin > 32
    assert _matmuls(plan_on)[0][1] == cpu_split


@pytest.mark.filterwarnings("ignore:invalid value")
def test_several_gemms_into_one_group_and_nan_inf(monkeypatch):
    x = _rand(50, 24)
    x[3, 5], x[7, 0] = np.inf, np.nan
    ws = [_rand(33, 24, seed=i) for i in range(3)]

    def make():
        @aj.compile
        def f(x, w1, w2, w3):  # the q/k/v input-gradient sum of attention's backward
            return x @ w1.T + x @ w2.T - (x @ w3.T) * 0.5

        return f

    got, ref, plan_on, _ = _both(make, (x, *ws), monkeypatch)
    want = x @ ws[0].T + x @ ws[1].T - (x @ ws[2].T) * 0.5
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.isnan(got[0]), np.isnan(want))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6, atol=1e-6)  # a GPU may contract FMAs
    assert sorted(e for e, _ in _matmuls(plan_on)) == [False, False, True]
    assert all(k.family == "matmul" for k in plan_on.kernels)


def test_bf16_linear_writes_its_cast_in_the_store(monkeypatch):
    x, w, b = _rand(4, 19, 40), _rand(70, 40) * 0.2, _rand(70)

    def make():
        @aj.compile(precision="bf16")
        def f(x, w, b):
            return F.gelu(F.linear(x, w, b)).astype("bf16")

        return f

    got, ref, plan_on, _ = _both(make, (x, w, b), monkeypatch)
    assert got[0].dtype == ref[0].dtype
    # one f32 ulp (FMA contraction) may move a bf16 rounding by one bf16 ulp
    np.testing.assert_allclose(got[0].astype(np.float32), ref[0].astype(np.float32),
                               rtol=8e-3, atol=1e-6)

    def to_bf16(a):  # round to nearest (ties away; random data has no ties)
        return (a.astype(np.float32).view(np.uint32) + 0x8000) & 0xFFFF0000

    xb, wb = (to_bf16(a).view(np.float32) for a in (x, w))
    want = gelu(xb.astype(np.float64) @ wb.T.astype(np.float64) + b)
    np.testing.assert_allclose(got[0].astype(np.float32), want, rtol=1e-2, atol=1e-2)
    assert any(e for e, _ in _matmuls(plan_on))


def test_not_fused_when_the_result_is_read_otherwise(monkeypatch):
    x, w = _rand(20, 30), _rand(26, 30)
    z = _rand(3, 20, 26, seed=4)

    def make():
        @aj.compile
        def f(x, w, z):
            y = x @ w.T
            return y + 1.0, y.T * 2.0, (x @ w.T) * 3.0 + z  # a transpose; a broadcast

        return f

    got, ref, plan_on, _ = _both(make, (x, w, z), monkeypatch)
    y = x.astype(np.float64) @ w.T.astype(np.float64)
    for a, want in zip(got, (y + 1.0, y.T * 2.0, y * 3.0 + z), strict=True):
        np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-5)
    for a, c in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
    assert not any(e for e, _ in _matmuls(plan_on))


def test_norm_gradient_takes_the_residual_add(monkeypatch):
    from alpha_jit import nn

    rng = np.random.default_rng(9)
    x0 = rng.standard_normal((5, 7, 48)).astype(np.float32)
    t = rng.standard_normal((5, 7, 48)).astype(np.float32)

    def make():
        nn.manual_seed(2)
        p, ln = nn.Parameter(x0), nn.LayerNorm(48)

        @aj.compile
        def f(t):
            h = p + ln(p)  # the residual stream: dx = t + norm_dx(t)
            (h * t).sum().backward()
            g = p.grad
            p.grad = None
            return g

        return f, ln

    f, ln = make()
    got = f(t).numpy()
    plan_on = _plan(f, (t,))
    monkeypatch.setenv("ALPHA_JIT_DISABLE_PASSES", "gemm_epilogue")
    f_off, _ = make()
    ref = f_off(t).numpy()
    plan_off = _plan(f_off, (t,))
    x = x0.astype(np.float64)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    rstd = 1 / np.sqrt(var + 1e-5)
    xh = (x - mean) * rstd
    gw = t * ln.weight.numpy()
    want = t + rstd * (gw - gw.mean(-1, keepdims=True) - xh * (gw * xh).mean(-1, keepdims=True))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)  # a GPU may contract FMAs
    on = [k for k in plan_on.lowered.kernels if k.spec.family == "norm_dx"]
    assert len(on) == 1 and "epilogue" in dict(on[0].spec.params)
    off = [k for k in plan_off.lowered.kernels if k.spec.family == "norm_dx"]
    assert len(off) == 1 and "epilogue" not in dict(off[0].spec.params)


def test_an_epilogue_using_its_own_indices_stays_correct():
    """A group indexing its own axes (iota: masks, one-hot) after a GEMM: the epilogue's
    indices are the GEMM's, so it must not run there unless they coincide."""
    x, w = _rand(6, 8), _rand(5, 8)

    @aj.compile
    def f(x, w):
        y = x @ w.T
        return y + aj.iota((6, 5), 0).astype("f32") * 100.0 + \
            aj.iota((6, 5), 1).astype("f32") * 1000.0

    want = x.astype(np.float64) @ w.T + np.arange(6)[:, None] * 100.0 + \
        np.arange(5)[None, :] * 1000.0
    np.testing.assert_allclose(f(x, w).numpy(), want, rtol=1e-5, atol=1e-3)


def test_a_16_bit_gemm_result_is_rounded_before_its_epilogue():
    x, w = _rand(8, 16), _rand(12, 16)

    @aj.compile
    def f(x, w):
        y = x.astype("bf16") @ w.astype("bf16").T  # no autocast: the result itself is bf16
        return y.astype("f32") * 1.0

    got = f(x, w).numpy()
    assert not (got.view(np.uint32) & 0xFFFF).any()  # every value a bf16 value, as stored


def test_tanh_gelu_and_its_gradient_at_special_values():
    """GELU's tanh form divides 1 by 1 + q, q in [0, 1], with the device's plain division
    (`div_normal`): infinities, NaN, signed zeros, huge and tiny inputs give the reference's
    answers, forward and gradient."""
    from alpha_jit.ir import trace
    from alpha_jit.ir.ops.elementwise import _gelu_grad_ref, _gelu_ref

    sp = [-np.inf, -1e30, -100.0, -20.0, -5.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 5.0, 20.0,
          100.0, 1e30, np.inf, np.nan]
    x = np.array(sp * 2, np.float32).reshape(4, 8)
    g = _rand(4, 8)
    attrs = {"approximate": "tanh"}

    @aj.compile
    def f(x, g):
        return F.gelu(x, approximate="tanh"), trace.apply("gelu_grad", [x, g], attrs)

    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    with np.errstate(all="ignore"):
        # NaN where the f32 reference has it (the gradient at |x| >= 1e13, whose x^3
        # overflows: 0 * inf, as PyTorch's formula gives); values against f64, where f32's
        # 1 + tanh(u) cancels (x = -5: 23% off)
        nans = [np.isnan(_gelu_ref([x], attrs)), np.isnan(_gelu_grad_ref([x, g], attrs))]
        want = [_gelu_ref([x64], attrs), _gelu_grad_ref([x64, g64], attrs)]
        got = [np.asarray(v) for v in f(x, g)]
    for a, b, nan in zip(got, want, nans, strict=True):
        assert np.array_equal(np.isnan(a), nan), (a, b)
        np.testing.assert_allclose(a[~nan], b[~nan].astype(np.float32), rtol=1e-5, atol=1e-35)
        assert np.array_equal(np.signbit(a[a == 0]), np.signbit(b[a == 0]))
