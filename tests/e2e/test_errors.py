"""Bad input gets a clear error naming the op, the shapes and the user's source line."""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.nn import functional as F
from tests.e2e.util import classifier_step

THIS = __file__


def _line_of(fn_src: str) -> int:
    with open(THIS) as f:
        for i, line in enumerate(f, 1):
            if fn_src in line:
                return i
    raise AssertionError(fn_src)


def test_matmul_shape_mismatch_names_op_shapes_and_line():
    @aj.compile
    def f(a, b):
        return a @ b  # MATMUL-LINE

    with pytest.raises(aj.ShapeError) as e:
        f(np.ones((4, 3), np.float32), np.ones((5, 2), np.float32))
    msg = str(e.value)
    assert msg.startswith("matmul:")
    assert "(4, 3)" in msg and "(5, 2)" in msg
    assert f"test_errors.py:{_line_of('# MATMUL-LINE')}" in msg


def test_broadcast_mismatch():
    @aj.compile
    def f(a, b):
        return a + b  # ADD-LINE

    with pytest.raises(aj.ShapeError) as e:
        f(np.ones((4, 3), np.float32), np.ones((4,), np.float32))
    msg = str(e.value)
    assert msg.startswith("add:") and "(4, 3)" in msg and "(4,)" in msg
    assert f"test_errors.py:{_line_of('# ADD-LINE')}" in msg


def test_float_labels_rejected():
    @aj.compile
    def f(z, y):
        return F.cross_entropy(z, y)  # CE-LINE

    with pytest.raises(aj.DTypeError) as e:
        f(np.ones((4, 3), np.float32), np.zeros((4,), np.float32))
    msg = str(e.value)
    assert "cross_entropy" in msg and "labels must be integer" in msg and "[4]" in msg
    assert f"test_errors.py:{_line_of('# CE-LINE')}" in msg


def test_mixed_dtypes_promote_as_in_pytorch():
    """i32 and f32 meet in f32; an i32 true division is f32; i32 * 0.5 is not truncated."""
    a, b = np.array([1.5, -2.0], np.float32), np.array([3, 7], np.int32)
    got = aj.compile(lambda a, b: (a * b, b / 2, b * 0.5, b // 2))(a, b)
    want = [a * b, b / 2, b * 0.5, b // 2]
    for g, w in zip(got, want, strict=True):
        assert g.numpy().dtype == w.dtype.type(0).astype(
            np.float32 if w.dtype.kind == "f" else np.int32).dtype
        np.testing.assert_array_equal(g.numpy(), w)


def test_bitwise_ops_on_integers_rejected():
    @aj.compile
    def f(a, b):
        return a & b

    with pytest.raises(aj.DTypeError, match=r"&: & is logical on masks"):
        f(np.ones((2,), np.int32), np.ones((2,), np.int32))


def test_out_of_range_labels_fail_before_gpu_work():
    nn.manual_seed(0)
    model = nn.Linear(3, 4)
    opt = nn.optim.SGD(model.parameters(), lr=0.1)

    step = classifier_step(model, opt)

    x = np.ones((2, 3), np.float32)
    step(x, np.array([0, 1], np.int32))
    w = model.weight.numpy()
    t = opt.step_count
    with pytest.raises(aj.AlphaJitError, match=r"cross_entropy: argument 1 .* index 7, outside"):
        step(x, np.array([0, 7], np.int32))
    np.testing.assert_array_equal(model.weight.numpy(), w)  # nothing ran
    assert opt.step_count == t


def test_data_dependent_control_flow_is_explained():
    @aj.compile
    def f(a):
        if a.sum() > 0:  # needs a value while tracing
            return a
        return -a

    with pytest.raises(aj.TraceError, match="data-dependent"):
        f(np.ones(3, np.float32))


def test_non_array_argument():
    @aj.compile
    def f(a):
        return a

    with pytest.raises(TypeError, match="numpy array"):
        f([1.0, 2.0])


def test_ignore_index_is_allowed_but_other_negatives_are_not():
    @aj.compile
    def f(z, y):
        return F.cross_entropy(z, y, ignore_index=-100)

    z = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    got = float(f(z, np.array([0, -100, 2, -100], np.int32)))
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert got == pytest.approx(-(logp[0, 0] + logp[2, 2]) / 2, rel=1e-5)
    with pytest.raises(aj.AlphaJitError, match=r"index -5, outside \[0, 3\)"):
        f(z, np.array([0, -5, 2, 1], np.int32))
