"""Row reductions: every mode, odd lengths, strided inputs, grid-striding over rows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels.reduction import generate_reduction, reference_reduction

from .conftest import rel_l2, validate
from .test_elementwise import from_bf16, to_bf16
from .test_matmul import tagged

rng = np.random.default_rng(99)


def red_spec(mode, outer_shape, outer_strides, offset, R, rs, in_dt="f32", out_dt="f32"):
    return KernelSpec("reduction", f"red_{mode}_{R}", (
        ("mode", mode), ("outer_shape", outer_shape), ("outer_strides", outer_strides),
        ("offset", offset), ("red_len", R), ("red_stride", rs), ("in_dtype", in_dt),
        ("out_dtype", out_dt)))


def build(s, caps=None):
    b = generate_reduction(s, caps)
    validate(b.words, b.name)
    return b


@pytest.mark.parametrize("mode", ["sum", "max", "mean", "lse"])
@pytest.mark.parametrize("R", [1, 7, 1000, 4097])
def test_strided_rows(run_kernel, mode, R):
    # Rows interleaved with the reduced axis (red_stride 6), outer dims transposed, offset 5.
    s = red_spec(mode, (3, 2), (1, 3), 5, R, 6)
    x = (rng.standard_normal(6 * R + 5) * 2).astype(np.float32)
    (out,) = run_kernel(build(s), [x], [((3, 2), np.float32)])
    assert rel_l2(out, reference_reduction(s, x)) < 1e-5


def test_contiguous_rows_bf16_in_f16_out(run_kernel):
    s = red_spec("lse", (33,), (300,), 0, 300, 1, "bf16", "f16")
    x = to_bf16(rng.standard_normal(33 * 300) * 4)
    (out,) = run_kernel(build(s), [x], [((33,), np.float16)])
    assert rel_l2(out, reference_reduction(s, x)) < 1e-2
    assert reference_reduction(s, x).shape == (33,)
    assert from_bf16(x).dtype == np.float32


def test_more_rows_than_workgroups(run_kernel):
    caps = SimpleNamespace(max_workgroup_count=(4, 65535, 65535))
    s = red_spec("sum", (5, 3), (3 * 50, 50), 0, 50, 1)
    b = build(s, caps)
    assert b.dispatches[0].groups == (4, 1, 1)
    x = rng.standard_normal(15 * 50).astype(np.float32)
    (out,) = run_kernel(b, [x], [((5, 3), np.float32)])
    assert rel_l2(out, x.reshape(5, 3, 50).astype(np.float64).sum(-1)) < 1e-5


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        generate_reduction(red_spec("prod", (2,), (1,), 0, 3, 2))


@pytest.mark.parametrize("mode", ["sum", "max", "mean", "lse"])
@pytest.mark.parametrize("R", [1, 4, 16])
def test_short_rows_thread_per_row(run_kernel, mode, R):
    # Short rows: one thread per row, several rows per workgroup, grid-striding over rows.
    rows = 1000
    s = red_spec(mode, (rows,), (R,), 3, R, 1)
    b = tagged(build(s, SimpleNamespace(max_workgroup_count=(4, 1, 1))), "grid4")
    assert b.notes["thread_per_row"] and b.dispatches[0].groups[0] == 4
    x = rng.standard_normal(rows * R + 3).astype(np.float32)
    (out,) = run_kernel(b, [x], [((rows,), np.float32)])
    assert rel_l2(out, reference_reduction(s, x)) < 1e-5


@pytest.mark.parametrize("device_type", ["cpu", "gpu"])
def test_sum_over_leading_axis(run_kernel, device_type):
    # sum over axis 0 of a (2048, 130) tensor: red_stride 130, rows contiguous.
    s = red_spec("sum", (130,), (1,), 0, 2048, 130)
    b = build(s, SimpleNamespace(device_type=device_type))
    b = tagged(b, device_type)  # same spec, other caps: a pipeline of its own
    assert b.notes.get("thread_per_row", False) == (device_type == "cpu")
    x = rng.standard_normal(2048 * 130).astype(np.float32)
    (out,) = run_kernel(b, [x], [((130,), np.float32)])
    assert rel_l2(out, reference_reduction(s, x)) < 1e-5


def test_long_rows_are_summed_whole_or_refused_on_llvmpipe():
    """llvmpipe ends every loop of an invocation after 65535 passes in all, without an error:
    a long column sum once came out as 65535. Long rows go to the layout whose loop bound
    fits (a workgroup per row); rows no layout can finish within the limit are refused by
    the plan, naming the kernel, before anything runs, never summed short."""
    import alpha_jit as aj
    from alpha_jit.runtime import get_device
    from alpha_jit.runtime.step_plan import MemoryPlanError

    x = np.ones((2**17 + 5, 2), np.float32)
    np.testing.assert_array_equal(aj.compile(lambda t: t.sum(0))(x).numpy(), [2**17 + 5] * 2)
    xi = np.ones((2**17 + 5, 2), np.int32)
    np.testing.assert_array_equal(aj.compile(lambda t: t.sum(0))(xi).numpy(), [2**17 + 5] * 2)
    if get_device().caps.device_type != "cpu":
        return
    with pytest.raises(MemoryPlanError, match=r"kernel \d+ \(sum_\w+, .*after 65535 in all"):
        aj.compile(lambda t: t.sum())(np.ones(2**24 + 8, np.float32))


@pytest.mark.parametrize("rows,R,serial", [(130, 2048, True), (130, 70000, False),
                                           (2, 70000, False), (1, 2**24 + 8, None)])
def test_cpu_layout_follows_the_loop_bound(rows, R, serial):
    """On a CPU device a column sum prefers a thread per row, unless its loop bound passes
    llvmpipe's limit and a workgroup per row's fits; no layout fitting, the kernel carries
    the problem (the plan refuses it)."""
    b = build(red_spec("sum", (rows,), (1,), 0, R, rows), SimpleNamespace(device_type="cpu"))
    if serial is None:
        assert "after 65535 in all" in b.notes["problem"] and "two steps" in b.notes["problem"]
        return
    assert "problem" not in b.notes and b.notes["loop_passes"] < 65535
    assert b.notes.get("thread_per_row", False) == serial


def strip_spec(mode, outer_shape, outer_strides, offset, R, rs, chunks, unroll, in_dt="f32",
               out_dt="f32"):
    s = red_spec(mode, outer_shape, outer_strides, offset, R, rs, in_dt, out_dt)
    return KernelSpec("reduction", f"{s.name}_strips{chunks}u{unroll}",
                      (*s.params, ("strips", chunks), ("unroll", unroll)))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("chunks,unroll", [(1, 1), (1, 4), (5, 4), (7, 3)])
def test_column_strips(run_kernel, mode, chunks, unroll):
    """The column-strip layout a GPU gets for a bias gradient, on lavapipe: columns across
    lanes (70: a ragged last strip), the 1003 rows in chunks and unrolled trips (ragged tail
    rows), an offset, NaN and inf columns; f32 and the chunks' workspace after `out`."""
    R, cols = 1003, 70
    s = strip_spec(mode, (cols,), (1,), 3, R, cols + 2, chunks, unroll)
    b = build(s)
    assert "column strips" in b.variant and len(b.dispatches) == (2 if chunks > 1 else 1)
    x = (rng.standard_normal(R * (cols + 2) + 3) * 3).astype(np.float32)
    x[3 + 500 * (cols + 2) + 4] = np.nan  # column 4 is NaN
    x[3 + 7 * (cols + 2) + 9] = np.inf  # column 9 is inf (max and sum alike)
    outs = [((cols,), np.float32)] + ([((chunks, cols), np.float32)] if chunks > 1 else [])
    out = run_kernel(b, [x], outs)[0]
    want = reference_reduction(s, x)
    assert np.isnan(out[4]) and np.isposinf(out[9])
    keep = np.isfinite(want)
    np.testing.assert_allclose(out[keep], want[keep], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_column_strips_bf16_over_a_middle_axis(run_kernel, mode):
    """sum over T of x [B=3, T=300, C=40] bf16 -> f32 [3, 40]: the columns are (b, c) pairs,
    not one contiguous run; bf16 into an f32 output (a bias gradient's dY)."""
    B, T, C = 3, 300, 40
    s = strip_spec(mode, (B, C), (T * C, 1), 0, T, C, 4, 2, "bf16", "f32")
    x = to_bf16(rng.standard_normal(B * T * C) * 2)
    outs = [((B, C), np.float32), ((4, B * C), np.float32)]
    out = run_kernel(build(s), [x], outs)[0]
    want = from_bf16(x).astype(np.float64).reshape(B, T, C)
    want = want.sum(1) if mode == "sum" else want.max(1)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)


def test_column_strips_are_chosen_for_strided_float_sums_on_gpus():
    from alpha_jit.codegen_spirv.kernels.reduction import strip_chunks

    gpu, cpu = SimpleNamespace(device_type="discrete"), SimpleNamespace(device_type="cpu")
    bias = red_spec("sum", (768,), (1,), 0, 8192, 768, "bf16").params
    assert strip_chunks(bias, gpu) > 1  # 24 strips of 32 columns do not fill a GPU alone
    assert strip_chunks(bias, cpu) is None  # lavapipe: a thread per column
    assert strip_chunks(red_spec("lse", (768,), (1,), 0, 8192, 768).params, gpu) is None
    assert strip_chunks(red_spec("sum", (768,), (1,), 0, 8192, 768, "i32").params, gpu) is None
    assert strip_chunks(red_spec("sum", (768,), (8192,), 0, 8192, 1).params, gpu) is None
    assert strip_chunks(red_spec("sum", (768,), (1,), 0, 8, 768).params, gpu) is None
    # more strips of 32 columns than workgroups along x: the grid-striding layout plans it
    small_grid = SimpleNamespace(device_type="discrete", max_workgroup_count=(65535, 1, 1))
    wide = red_spec("sum", (3_000_000,), (1,), 0, 20, 3_000_000).params
    assert strip_chunks(wide, small_grid) is None and strip_chunks(wide, gpu) is None
    assert strip_chunks(red_spec("sum", (65535 * 32,), (1,), 0, 20, 65535 * 32).params,
                        small_grid) is not None


def test_column_strips_inside_a_step(monkeypatch):
    """Forced on lavapipe (a GPU's choice): a Linear's bias gradient and a mean over the
    batch axis lower to column strips with a workspace temporary, and match float64."""
    import alpha_jit as aj
    from alpha_jit.codegen_spirv.kernels import reduction

    monkeypatch.setattr(reduction, "strip_chunks", lambda params, caps: 3)
    x = rng.standard_normal((64, 30)).astype(np.float32)
    g = rng.standard_normal((64, 50)).astype(np.float32)
    w = rng.standard_normal((50, 30)).astype(np.float32)

    @aj.compile
    def step(x, g, w):
        y = x @ w.T
        return (y * g).sum(0), y.mean(0), (y * g).amax(0)

    got = [np.asarray(t) for t in step(x, g, w)]
    y = x.astype(np.float64) @ w.T.astype(np.float64)
    for a, want in zip(got, [(y * g).sum(0), y.mean(0), (y * g).max(0)], strict=True):
        np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-4)
    (exe,) = [e for es in step.cache.values() for e in es]
    variants = [b.variant for b in exe.binaries]
    assert sum("column strips" in v for v in variants) == 3, variants
