"""Fused elementwise kernels: spirv-val on every module, then lavapipe results vs numpy."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels.elementwise import (
    generate_elementwise,
    reference_elementwise,
)

from .conftest import rel_l2, validate
from .rules import scalar_rule

rng = np.random.default_rng(1234)


def spec(name, shape, inputs, exprs, outputs) -> KernelSpec:
    return KernelSpec("elementwise", name, (("shape", shape), ("inputs", inputs),
                                            ("exprs", exprs), ("outputs", outputs)))


def build(s, caps=None):
    b = generate_elementwise(s, caps, scalar_rule)
    validate(b.words, b.name)
    return b


def to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16 bits (uint16)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


BROADCAST = spec(
    "bcast", (37, 300),
    (("f32", (300, 1), 0), ("f32", (0, 1), 0), ("f32", (1, 0), 0)),
    (("exp", "f32", (), (("in", 0),)), ("mul", "f32", (), (("e", 0), ("in", 1))),
     ("add", "f32", (), (("e", 1), ("in", 2)))),
    (("f32", 2),))


def test_broadcast(run_kernel):
    a = rng.standard_normal((37, 300)).astype(np.float32)
    b = rng.standard_normal(300).astype(np.float32)
    c = rng.standard_normal(37).astype(np.float32)
    (out,) = run_kernel(build(BROADCAST), [a, b, c], [((37, 300), np.float32)])
    want = np.exp(a.astype(np.float64)) * b + c[:, None]
    assert rel_l2(out, want) < 1e-5


def test_transposed_offset_view_and_unary_math(run_kernel):
    # in0: a (300, 41) buffer read transposed with a 5-element offset; in1 contiguous.
    s = spec("transposed", (40, 300),
             (("f32", (1, 41), 5), ("f32", (300, 1), 0)),
             (("tanh", "f32", (), (("in", 0),)), ("abs", "f32", (), (("in", 1),)),
              ("sqrt", "f32", (), (("e", 1),)), ("rsqrt", "f32", (), (("e", 1),)),
              ("log", "f32", (), (("e", 1),)), ("neg", "f32", (), (("e", 0),)),
              ("mul", "f32", (), (("e", 2), ("e", 3))), ("sub", "f32", (), (("e", 6), ("e", 4))),
              ("div", "f32", (), (("e", 7), ("const", 3.0, "f32"))),
              ("pow", "f32", (), (("e", 1), ("const", 1.5, "f32"))),
              ("max", "f32", (), (("e", 5), ("e", 9)))),
             (("f32", 8), ("f32", 5), ("f32", 10)))
    buf = (rng.standard_normal(300 * 41 + 5) * 3).astype(np.float32)
    buf[5:50] = np.linspace(-1e-3, 1e-3, 45)  # tanh accuracy near zero matters
    y = (rng.standard_normal((40, 300)) + 0.1).astype(np.float32)
    outs = run_kernel(build(s), [buf, y], [((40, 300), np.float32)] * 3)
    x = np.lib.stride_tricks.as_strided(buf[5:].astype(np.float64), (40, 300), (8, 41 * 8))
    ay = np.abs(y.astype(np.float64))
    want = [(np.sqrt(ay) / np.sqrt(ay) - np.log(ay)) / 3.0, -np.tanh(x),
             np.maximum(-np.tanh(x), ay ** 1.5)]
    for got, w in zip(outs, want, strict=True):
        assert rel_l2(got, w) < 1e-5


def test_int_bool_compare_select_iota(run_kernel):
    s = spec("ints", (13, 29),
             (("i32", (29, 1), 0), ("i32", (0, 1), 0), ("f32", (29, 1), 0)),
             (("add", "i32", (), (("in", 0), ("in", 1))),
              ("div", "i32", (), (("e", 0), ("const", 3, "i32"))),
              ("gt", "bool", (), (("in", 0), ("iota", 0))),
              ("select", "i32", (), (("e", 2), ("e", 1), ("iota", 1))),
              ("max", "i32", (), (("e", 3), ("in", 1))),
              ("cast", "f32", (("dtype", "f32"),), (("e", 2),)),
              ("cast", "i32", (("dtype", "i32"),), (("in", 2),)),
              ("le", "bool", (), (("in", 2), ("const", 0.25, "f32"))),
              ("ne", "bool", (), (("e", 6), ("const", 0, "i32")))),
             (("i32", 4), ("bool", 2), ("f32", 5), ("i32", 6), ("bool", 7), ("bool", 8)))
    a = rng.integers(-50, 50, (13, 29)).astype(np.int32)
    b = rng.integers(-9, 9, 29).astype(np.int32)
    f = (rng.standard_normal((13, 29)) * 3).astype(np.float32)
    outs = run_kernel(build(s), [a, b, f],
                      [((13, 29), np.int32), ((13, 29), np.int32), ((13, 29), np.float32),
                       ((13, 29), np.int32), ((13, 29), np.int32), ((13, 29), np.int32)])
    ref = reference_elementwise(s, [a, b, f], scalar_rule)
    for got, want in zip(outs, ref, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(outs[0], np.maximum(
        np.where(a > np.arange(13)[:, None], (a + b) // 3, np.arange(29)), b))


@pytest.mark.parametrize("storage16", [True, False])
def test_f16_bf16_storage(run_kernel, storage16):
    n = 1000  # not a multiple of 256
    caps = SimpleNamespace(storage_buffer_16bit=storage16, float16=storage16)
    ins = (("bf16", (1,), 0),) if not storage16 else (("bf16", (1,), 0), ("f16", (1,), 0))
    second = ("in", 1) if storage16 else ("const", 0.5, "f32")
    s = spec(f"half_{storage16}", (n,), ins,
             (("mul", "f32", (), (("in", 0), second)),
              ("add", "f32", (), (("e", 0), ("in", 0)))),
             (("bf16", 1), ("f16" if storage16 else "f32", 0)))
    x = rng.standard_normal(n).astype(np.float32)
    xb = to_bf16(x)
    arrays = [xb]
    h = np.float32(0.5)
    if storage16:
        h = rng.standard_normal(n).astype(np.float16)
        arrays.append(h)
    out_b, out_h = run_kernel(build(s, caps), arrays,
                              [((n,), np.uint16), ((n,), np.float16 if storage16 else np.float32)])
    xf = from_bf16(xb).astype(np.float64)
    prod = xf * np.asarray(h, np.float64)
    assert rel_l2(out_h, prod) < 1e-2
    # Stored bf16 must be the round-to-nearest-even of the f32 result, bit for bit.
    want = (prod.astype(np.float32) + from_bf16(xb)).astype(np.float32)
    np.testing.assert_array_equal(out_b, to_bf16(want))


def test_split_dispatches(run_kernel):
    caps = SimpleNamespace(max_workgroup_count=(3, 65535, 65535))
    n = 3001
    s = spec("split", (n,), (("f32", (1,), 0),),
             (("mul", "f32", (), (("in", 0), ("in", 0))),), (("f32", 0),))
    b = build(s, caps)
    assert len(b.dispatches) == 4 and all(d.groups[0] <= 3 for d in b.dispatches)
    x = rng.standard_normal(n).astype(np.float32)
    (out,) = run_kernel(b, [x], [((n,), np.float32)])
    assert rel_l2(out, x.astype(np.float64) ** 2) < 1e-6


def test_dispatch_plan_without_device():
    b = generate_elementwise(BROADCAST, None, scalar_rule)
    assert b.local_size == (256, 1, 1) and b.push_constant_size == 8
    assert [x.name for x in b.bindings] == ["in0", "in1", "in2", "out0"]
    assert b.dispatches[0].groups == (-(-37 * 300 // 256), 1, 1)
