"""Row reductions: every mode, odd lengths, strided inputs, grid-striding over rows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels.reduction import generate_reduction, reference_reduction

from .conftest import rel_l2, validate
from .test_elementwise import from_bf16, to_bf16

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
