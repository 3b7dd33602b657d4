"""Multi-tensor kernels: horizontal fusion of same-expression elementwise kernels and the
multi-tensor sum of squares, against numpy and against the same program with the pass off."""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.ir import trace
from alpha_jit.runtime.device import get_device
from alpha_jit.runtime.step_plan import plan_step
from tests.e2e.util import lm_step

SHAPES = [(3,), (64, 33), (1000,), (7, 5, 3), (70001,)]


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _families(fn, args):
    plan = plan_step(fn.trace(*args).graph, get_device().caps, progress=False)
    return [k.family for k in plan.kernels], plan


def test_sum_squares_of_many_tensors_matches_numpy():
    arrs = _arrays()

    @aj.compile
    def f(*xs):
        return trace.apply("sum_squares", list(xs))

    want = sum(np.sum(a.astype(np.float64) ** 2) for a in arrs)
    assert float(f(*arrs)) == pytest.approx(want, rel=1e-6)
    fams, _ = _families(f, arrs)
    assert fams.count("sumsq_partial") >= 1 and fams.count("sumsq_final") == 1
    arrs[2][5] = np.inf
    assert float(f(*arrs)) == np.inf
    arrs[0][1] = np.nan
    assert np.isnan(float(f(*arrs)))


def test_sum_squares_beyond_the_binding_limit_splits_into_stage_one_kernels():
    caps = get_device().caps
    # more tensors than one kernel binds (lowering binds at most 64 per kernel on any device)
    n = min(caps.max_storage_buffers_per_stage, 64) + 5
    rng = np.random.default_rng(1)
    arrs = [rng.standard_normal(3 + i).astype(np.float32) for i in range(n)]

    @aj.compile
    def f(*xs):
        return trace.apply("sum_squares", list(xs))

    want = sum(np.sum(a.astype(np.float64) ** 2) for a in arrs)
    assert float(f(*arrs)) == pytest.approx(want, rel=1e-6)
    fams, _ = _families(f, arrs)
    assert fams.count("sumsq_partial") >= 2


def _per_tensor_step():
    @aj.compile
    def f(*xs):  # the same expression on every tensor: one kernel each without the pass
        return [(x * 1.5 + 0.25).exp() - x for x in xs]

    return f


def test_horizontal_fusion_merges_independent_kernels_and_keeps_values(monkeypatch):
    arrs = _arrays(2)
    want = [(a * np.float32(1.5) + np.float32(0.25)).astype(np.float32) for a in arrs]
    want = [np.exp(w) - a for w, a in zip(want, arrs, strict=True)]
    fused = _per_tensor_step()
    got = [v.numpy() for v in fused(*arrs)]
    fams, _ = _families(fused, arrs)
    assert fams.count("elementwise_multi") >= 1 and len(fams) < len(SHAPES)
    monkeypatch.setenv("ALPHA_JIT_DISABLE_PASSES", "horizontal")
    plain = _per_tensor_step()
    ref = [v.numpy() for v in plain(*arrs)]
    fams_off, _ = _families(plain, arrs)
    assert "elementwise_multi" not in fams_off and len(fams_off) == len(SHAPES)
    for g, r, w in zip(got, ref, want, strict=True):
        np.testing.assert_array_equal(g, r)  # the same arithmetic, merged or not
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_dependent_kernels_are_not_merged():
    """y = f(x) then z = f(y): same expression, but z needs y, so two kernels in order."""
    x = np.random.default_rng(3).standard_normal((50, 7)).astype(np.float32)

    @aj.compile
    def f(x):
        y = (x * 0.5 + 0.25).exp() - x
        return y, ((y * 0.5 + 0.25).exp() - y).sum()

    y, z = f(x)
    yw = np.exp(x * np.float32(0.5) + np.float32(0.25)) - x
    np.testing.assert_allclose(y.numpy(), yw, rtol=1e-6)
    zw = (np.exp(yw.astype(np.float64) * 0.5 + 0.25) - yw).sum()
    assert float(z) == pytest.approx(zw, rel=1e-5)
    fams, _ = _families(f, [x])
    assert "elementwise_multi" not in fams


def test_gpt_step_uses_multi_tensor_kernels_and_matches_the_unfused_step(monkeypatch):
    cfg = nn.GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    rng = np.random.default_rng(4)
    x = rng.integers(0, 32, (2, 8)).astype(np.int32)
    y = rng.integers(0, 32, (2, 8)).astype(np.int32)

    def run():
        nn.manual_seed(0)
        model = nn.GPT(cfg)
        opt = nn.optim.AdamW(model.optim_groups(0.1), lr=1e-2)

        step = lm_step(model, opt, clip=0.5)
        out = [(float(a), float(b)) for a, b in (step(x, y) for _ in range(3))]
        return out, [p.numpy() for p in model.parameters()], step

    fused, w_fused, step = run()
    fams, _ = _families(step, [x, y])
    assert fams.count("elementwise_multi") >= 2  # AdamW groups, weight casts
    monkeypatch.setenv("ALPHA_JIT_DISABLE_PASSES", "horizontal")
    plain, w_plain, _ = run()
    assert fused == plain
    for a, b in zip(w_fused, w_plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bf16_casts_feeding_gemms_are_rounded_on_load(monkeypatch):
    """Under bf16 the operand casts of every GEMM disappear into the GEMM's loads, with the
    same rounding: results are bit-identical to the step with the cast kernels."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((37, 29)).astype(np.float32)
    w = rng.standard_normal((23, 29)).astype(np.float32)
    b = rng.standard_normal((23,)).astype(np.float32)

    def build():
        @aj.compile(precision="bf16")
        def f(x, w, b):
            h = (x @ w.T + b).relu()  # a bare matmul's result is f32 (a Linear's is bf16)
            return (h @ h.T).sum(axis=0), h

        return f

    def run():
        f = build()
        out = [v.numpy() for v in f(x, w, b)]
        fams, plan = _families(f, [x, w, b])
        bf16 = sum(1 for b in plan.lowered.buffers.values() if b.dtype.name == "bf16")
        rounded = sum(1 for k in plan.lowered.kernels if k.spec.family == "matmul"
                      and any(key.endswith("_round") for key, _ in k.spec.params))
        return out, bf16, rounded, len(fams)

    got, bf16, rounded, n = run()
    monkeypatch.setenv("ALPHA_JIT_DISABLE_PASSES", "gemm_prologue")
    ref, bf16_off, rounded_off, n_off = run()
    # no bf16 copy of any operand is stored; every GEMM operand is rounded on load
    assert bf16 == 0 and rounded >= 2 and bf16_off >= 3 and rounded_off == 0 and n <= n_off
    for a, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, r)


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_reductions_over_adjacent_axes_are_one_kernel(op):
    x = np.random.default_rng(6).standard_normal((4, 5, 6, 7)).astype(np.float32)
    x[1, 2, 3, 4] = np.nan if op == "max" else x[1, 2, 3, 4]

    @aj.compile
    def f(x):
        return (getattr(x, op)(axis=(0, 1)), getattr(x, op)(axis=(1, 2), keepdims=True),
                getattr(x, op)(axis=(0, 2)))

    got = [v.numpy() for v in f(x)]
    ref = getattr(np, op)
    want = [ref(x.astype(np.float64), axis=(0, 1)), ref(x.astype(np.float64), axis=(1, 2),
                                                         keepdims=True),
            ref(x.astype(np.float64), axis=(0, 2))]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    fams, plan = _families(f, [x])
    # (0, 1) and (1, 2) merge into one reduction each; (0, 2) is not adjacent: two
    assert fams.count("reduction") == 4


def test_sum_squares_reads_transposed_and_partitioned_tensors_in_place():
    x = np.random.default_rng(8).standard_normal((6, 10)).astype(np.float32)

    @aj.compile
    def f(x):
        y = x * 2.0 + 1.0
        parts = [y[:, :4], y[:, 4:7], y[:, 7:]]  # columns: each strided, together all of y
        z = (x - 1.0).T  # transposed: dense in another order
        w = y[:2, :3]  # a strided part that covers nothing whole: copied
        return trace.apply("sum_squares", [*parts, z, w])

    y = x.astype(np.float64) * 2 + 1
    want = (y ** 2).sum() + ((x - 1.0) ** 2).sum() + (y[:2, :3] ** 2).sum()
    assert float(f(x)) == pytest.approx(want, rel=1e-5)
    fams, plan = _families(f, [x])
    copies = [k for k in plan.lowered.kernels if k.spec.name.endswith("copy_view")]
    assert len(copies) == 1  # only w's


@pytest.mark.parametrize("where", ["early", "tail"])
def test_sum_squares_odd_sizes_offsets_and_bf16(where):
    """Tensors whose sizes are no multiple of 4 or 8, a row slice at an odd offset and a bf16
    tensor each count every element once; an inf or NaN anywhere (`where`: early, or among
    the last elements) reaches the result. (16-byte loads here ran the H200's stage 1 at
    0.9 TB/s against 1.5 for one element a load, session 13: not kept.)"""
    rng = np.random.default_rng(11)
    a = rng.standard_normal(4 * 37 + 3).astype(np.float32)
    b = rng.standard_normal((9, 5)).astype(np.float32)
    c = rng.standard_normal(8 * 21 + 5).astype(np.float32)

    @aj.compile
    def f(a, b, c):
        y = b * 2.0 - 0.5
        low = (c * 1.5).bfloat16()
        return trace.apply("sum_squares", [a, y[1:], low, y[:1, 1:4]])

    y = b.astype(np.float64) * 2 - 0.5
    low = aj.dtypes.bf16_to_f32(aj.dtypes.f32_to_bf16((c * 1.5).astype(np.float32)))
    want = (a.astype(np.float64) ** 2).sum() + (y[1:] ** 2).sum() \
        + (low.astype(np.float64) ** 2).sum() + (y[:1, 1:4] ** 2).sum()
    assert float(f(a, b, c)) == pytest.approx(want, rel=1e-5)
    i = 4 * 5 + 1 if where == "early" else a.size - 2
    for v, check in ((np.inf, lambda r: r == np.inf), (np.nan, np.isnan)):
        a2 = a.copy()
        a2[i] = v
        assert check(float(f(a2, b, c)))
