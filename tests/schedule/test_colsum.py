"""GEMM K sums: a Linear's bias gradient comes out of its weight-gradient GEMM, as the row sums
of a (dY^T @ x, the layout gemm_transpose gives it) or, with that pass off, the column sums of
b (x^T @ dY). Values against numpy and against the same step with the pass off (f32, bf16,
shapes that fill no tile, K split over dispatches on CPU devices); where it must fire and
where it must not."""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.runtime.device import get_device
from alpha_jit.runtime.step_plan import plan_step
from tests.e2e.util import linear_grads_step


def _run(lin, x, t, precision, monkeypatch, off, orient=""):
    off_list = ["gemm_colsum"] if off else []
    if orient == "colsum_b":
        off_list.append("gemm_transpose")
    if off_list:
        monkeypatch.setenv("ALPHA_JIT_DISABLE_PASSES", ",".join(off_list))
    step = linear_grads_step(lin, precision)
    got = [v.numpy() for v in step(x, t)]
    plan = plan_step(step.trace(x, t).graph, get_device().caps, progress=False)
    monkeypatch.delenv("ALPHA_JIT_DISABLE_PASSES", raising=False)
    return got, plan


def _colsum_kernels(plan, key=None):
    keys = (key,) if key else ("colsum_b", "rowsum_a")
    return [k for k in plan.lowered.kernels
            if any(dict(k.spec.params).get(kk) for kk in keys)]


@pytest.mark.parametrize("orient", ["rowsum_a", "colsum_b"])
@pytest.mark.parametrize("rows", [20, 111])  # K of the dW GEMM: one CPU chunk, then several
@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_bias_gradient_from_the_weight_gradient_gemm(monkeypatch, rows, precision, orient):
    rng = np.random.default_rng(rows)
    nn.manual_seed(1)
    lin = nn.Linear(29, 45)
    x = rng.standard_normal((rows, 29)).astype(np.float32)
    t = rng.standard_normal((rows, 45)).astype(np.float32)
    got, plan = _run(lin, x, t, precision, monkeypatch, off=False, orient=orient)
    ref, plan_off = _run(lin, x, t, precision, monkeypatch, off=True, orient=orient)
    assert len(_colsum_kernels(plan, orient)) == 1 and not _colsum_kernels(plan_off)
    assert len(_colsum_kernels(plan)) == 1
    fams = [k.family for k in plan.kernels]
    assert fams.count("reduction") < [k.family for k in plan_off.kernels].count("reduction")
    if precision == "f32":
        w, b = lin.weight.numpy().astype(np.float64), lin.bias.numpy().astype(np.float64)
        dy = 2 * (x @ w.T + b - t)
        np.testing.assert_allclose(got[2], dy.sum(axis=0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[1], dy.T @ x, rtol=1e-4, atol=1e-4)
    # the same sums as the reduction kernel computes, up to f32 summation order
    for a, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=2e-5, atol=1e-4)


def test_not_fused_when_no_gemm_reads_the_summed_value():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((50, 20)).astype(np.float32), \
        rng.standard_normal((30, 20)).astype(np.float32)

    @aj.compile
    def f(x, w):
        y = x @ w.T
        return y.sum(axis=0), (y * 2.0) @ w, (x * 3.0).sum(axis=0)  # the GEMM reads y * 2

    got = [v.numpy() for v in f(x, w)]
    y = x.astype(np.float64) @ w.T
    for a, want in zip(got, (y.sum(axis=0), (2 * y) @ w, 3 * x.sum(axis=0)), strict=True):
        np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-4)
    plan = plan_step(f.trace(x, w).graph, get_device().caps, progress=False)
    assert not _colsum_kernels(plan)


def test_gemm_whose_operand_is_not_computed_yet_is_not_pulled_forward():
    """The bias-like sum comes first; the GEMM's left operand (a copy: no strided form) is
    computed later. The GEMM must not run at the sum's place."""
    rng = np.random.default_rng(0)
    dy = rng.standard_normal((8, 5)).astype(np.float32)
    x = rng.standard_normal((4, 6)).astype(np.float32)

    @aj.compile
    def f(dy, x):
        r = dy.sum(0)
        z = x * x.sum()
        return r, z.T.reshape(3, 8) @ dy

    r, m = (v.numpy() for v in f(dy, x))
    z = x.astype(np.float64) * x.sum()
    np.testing.assert_allclose(r, dy.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m, z.T.reshape(3, 8) @ dy, rtol=1e-5, atol=1e-4)
