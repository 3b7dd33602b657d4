"""GEMM transpose folding: `(a @ b).T` is computed as `b.T @ a.T`. Values against numpy
through the public API (operators, batched, transposed operands, results returned and reused),
where the rewrite must fire and where it must not, and the layout it gives weight gradients."""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.runtime.device import get_device
from alpha_jit.runtime.step_plan import plan_step
from tests.e2e.util import linear_grads_step

rng = np.random.default_rng(5)


def _r(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def _bf16(v):
    """float64 values rounded to bf16 (nearest even)."""
    from alpha_jit import dtypes

    return dtypes.bf16_to_f32(dtypes.f32_to_bf16(v.astype(np.float32))).astype(np.float64)


def _transposed_gemms(graph) -> int:
    """Transposes reading a matmul directly (what the pass rewrites)."""
    return sum(graph.op(graph.args(t)[0]) == "matmul" for t in graph.nodes_with_op("transpose"))


def _check(fn, args, want, folded: bool, tol=1e-4):
    f = aj.compile(fn)
    got = f(*args)
    got = got if isinstance(got, tuple) else (got,)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.numpy().dtype == np.float32
        np.testing.assert_allclose(g.numpy(), w, rtol=tol, atol=tol)
    traced = f.trace(*args)
    summary = dict((n, s) for n, s, _ in traced.pass_history)["gemm_transpose"]
    assert summary.startswith("1 " if folded else "0 "), summary
    assert (_transposed_gemms(traced.graph) == 0) == folded
    return traced


def test_transposed_product_plus_a_matrix():
    a, b, c = _r(37, 20), _r(20, 53), _r(53, 37)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    t = _check(lambda a, b, c: (a @ b).T + c, (a, b, c), [(a64 @ b64).T + c], folded=True)
    plan = plan_step(t.graph, get_device().caps, progress=False)
    # the add reads the product in its own layout: it runs in the GEMM's store
    assert [k.family for k in plan.kernels] == ["matmul"]


def test_batched_swap_of_the_last_axes_and_transposed_operands():
    x, y = _r(3, 17, 9), _r(3, 17, 11)  # x^T @ y, then swapped: y^T @ x, no transposes left
    want = np.swapaxes(np.swapaxes(x, 1, 2).astype(np.float64) @ y, 1, 2)
    _check(lambda x, y: (x.mT @ y).mT * 2.0, (x, y), [2.0 * want], folded=True)


@pytest.mark.parametrize("case", ["other_perm", "used_twice", "broadcast_batch", "returned"])
def test_not_folded(case):
    a3, b3 = _r(2, 5, 7), _r(2, 7, 6)
    a, b = _r(5, 7), _r(7, 6)
    if case == "other_perm":  # batch and rows swapped, not the last two axes
        fn, args = (lambda a, b: (a @ b).permute(1, 0, 2) + 1.0), (a3, b3)
        want = [np.transpose(a3.astype(np.float64) @ b3, (1, 0, 2)) + 1.0]
    elif case == "used_twice":  # the product is read as it is too
        fn, args = (lambda a, b: ((a @ b).T * 3.0, (a @ b).sum())), (a, b)
        p = a.astype(np.float64) @ b
        want = [3.0 * p.T, np.array(p.sum())]
    elif case == "broadcast_batch":  # b shared by the batch: rank 3 against rank 2
        fn, args = (lambda a, b: (a @ b).mT - 1.0), (a3, b)
        want = [np.swapaxes(a3.astype(np.float64) @ b, 1, 2) - 1.0]
    else:  # the product itself leaves the step
        fn, args = (lambda a, b: (a @ b, (a @ b).T)), (a, b)
        p = a.astype(np.float64) @ b
        want = [p, p.T]
    _check(fn, args, want, folded=False)


def test_non_finite_values_stay_where_they_were():
    a, b = _r(8, 4), _r(4, 6)
    a[3, 1], b[2, 5] = np.inf, np.nan
    with np.errstate(invalid="ignore"):
        want = (a.astype(np.float64) @ b).T
    _check(lambda a, b: (a @ b).T + 0.0, (a, b), [want], folded=True)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_linear_weight_gradient_in_the_weight_layout(precision):
    """A Linear's dW = dY^T x written [out, in] by its GEMM, the bias gradient from the same
    GEMM's row sums of dY^T; values against numpy (f32) and the unfused step."""
    nn.manual_seed(2)
    lin = nn.Linear(24, 40)
    x, t = _r(67, 24), _r(67, 40)

    step = linear_grads_step(lin, precision)
    _, dw, db = (v.numpy() for v in step(x, t))
    plan = plan_step(step.trace(x, t).graph, get_device().caps, progress=False)
    gemms = [dict(k.spec.params) for k in plan.lowered.kernels if k.spec.family == "matmul"]
    summed = [p for p in gemms if p.get("rowsum_a")]
    assert len(summed) == 1 and (summed[0]["m"], summed[0]["n"]) == (40, 24)
    assert not [p for p in gemms if p.get("colsum_b")]
    w, b = lin.weight.numpy().astype(np.float64), lin.bias.numpy().astype(np.float64)
    dy = 2 * (x @ w.T + b - t)
    tol = 1e-4 if precision == "f32" else 3e-2
    np.testing.assert_allclose(dw, dy.T @ x, rtol=tol, atol=tol * np.abs(dy.T @ x).max())
    np.testing.assert_allclose(db, dy.sum(axis=0), rtol=tol, atol=tol * np.abs(dy).sum(0).max())


def test_bf16_output_gradient_is_stored_once_in_16_bits():
    """cast_fold rewrite 3 + the prologue rule: under bf16 a Linear's output gradient (a GELU
    derivative here) is stored only as bf16: its dX and dW GEMMs read 16-bit operands (no
    rounding on load) and the bias gradient sums the same bf16 copy, in f32. Values against the
    reference interpreter on the same graph and, loosely, against float64 numpy."""
    from alpha_jit.ir import interpreter

    nn.manual_seed(4)
    fc, proj = nn.Linear(16, 48), nn.Linear(48, 16)
    x = _r(70, 16)

    @aj.compile(precision="bf16")
    def step(x):
        h = nn.functional.gelu(fc(x))
        loss = (proj(h) * proj(h)).sum()
        loss.backward()
        grads = (fc.weight.grad, fc.bias.grad)
        fc.weight.grad = fc.bias.grad = proj.weight.grad = proj.bias.grad = None
        return grads

    before = {p: p.numpy().copy() for p in (fc.weight, fc.bias, proj.weight, proj.bias)}
    dw, db = (v.numpy() for v in step(x))
    traced = step.trace(x)
    summary = dict((n, s) for n, s, _ in traced.pass_history)["cast_fold"]
    assert "1 sums reading the 16-bit copy" in summary, summary  # fc's (GELU derivative)
    plan = plan_step(traced.graph, get_device().caps, progress=False)
    gemms = [dict(k.spec.params) for k in plan.lowered.kernels if k.spec.family == "matmul"]
    fc_dw = [p for p in gemms if p.get("rowsum_a") and (p["m"], p["n"]) == (48, 16)]
    assert len(fc_dw) == 1  # reads the bf16 copy the GELU-derivative epilogue stores
    assert fc_dw[0]["a"][0] == "bf16" and "a_round" not in fc_dw[0], fc_dw
    outs, _ = interpreter.run(traced.graph, traced.leaves(
        [x], {k: s.numpy() for k, s in traced.state.items()}, {}))
    np.testing.assert_allclose(dw, outs[0], rtol=2e-3, atol=2e-3 * np.abs(outs[0]).max())
    np.testing.assert_allclose(db, outs[1], rtol=2e-3, atol=2e-3 * np.abs(outs[1]).max())
    w1, b1, w2, b2 = (before[p].astype(np.float64) for p in (fc.weight, fc.bias, proj.weight,
                                                              proj.bias))
    u = x @ w1.T + b1
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (u + 0.044715 * u**3))
    h = 0.5 * u * (1 + t)
    dh = (2 * (h @ w2.T + b2)) @ w2
    du = dh * (0.5 * (1 + t) + 0.5 * u * (1 - t * t) * c * (1 + 3 * 0.044715 * u * u))
    np.testing.assert_allclose(db, du.sum(axis=0), rtol=5e-2, atol=5e-2 * np.abs(du).sum(0).max())
    np.testing.assert_allclose(dw, du.T @ x, rtol=5e-2, atol=5e-2 * np.abs(du.T @ x).max())


@pytest.mark.parametrize("case", ["forward_sum", "input_sum", "user_casts_backward"])
def test_sums_the_user_wrote_stay_f32(case):
    """cast_fold rewrite 3 reads only the precision policy's casts in the backward: a sum the
    user wrote, or the gradient of a user's own bf16 GEMM in an f32 program, keeps summing f32
    values (1e-5 against float64, where reading a bf16 copy is off by about 1e-3)."""
    x, w, t = _r(40, 24), _r(24, 16), _r(40, 16)
    x64, w64, t64 = (v.astype(np.float64) for v in (x, w, t))
    if case == "forward_sum":
        fn = aj.compile(lambda x, w: ((x * 1.37 + 0.1).sum(0), (
            (x * 1.37 + 0.1).bfloat16() @ w.bfloat16()).float()))
        got = fn(x, w)[0].numpy()
        want = (x64 * np.float32(1.37) + np.float32(0.1)).sum(0)
    elif case == "input_sum":
        nn.manual_seed(0)
        lin = nn.Linear(24, 16)
        fn = aj.compile(lambda x: (lin(x).float().sum(), x.sum(0)), precision="bf16")
        got = fn(x)[1].numpy()
        want = x64.sum(0)
    else:
        nn.manual_seed(0)
        b = nn.Parameter(np.linspace(-1, 1, 16).astype(np.float32))
        wp = nn.Parameter(w)

        @aj.compile
        def step(x, t):
            h = (x.bfloat16() @ wp.bfloat16()).float() + b  # an f32 program's own bf16 GEMM
            loss = ((h - t) * (h - t)).sum()
            loss.backward()
            g = b.grad
            b.grad = wp.grad = None
            return g

        got = step(x, t).numpy()
        # the bf16 GEMM returns bf16 (no autocast: no f32 accumulator result)
        h = _bf16(_bf16(x64) @ _bf16(w64)) + np.linspace(-1, 1, 16).astype(np.float32)
        want = (2 * (h - t64)).sum(0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
