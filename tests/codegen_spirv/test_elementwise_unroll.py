"""Unrolled flat kernels (`FlatGrid`: several elements per thread, loads before stores) on
lavapipe vs numpy: ragged sizes, strided, broadcast and padded inputs, in place (an output bound
to an input's buffer), multi-tensor kernels of many odd segments, the multi-dispatch split, and
the cross-entropy gradient. spirv-val on every module."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels.cross_entropy import generate_ce_bwd
from alpha_jit.codegen_spirv.kernels.elementwise import (
    UNROLL_MIN_ELEMENTS,
    generate_elementwise,
    generate_elementwise_multi,
    reference_elementwise,
)

from .conftest import validate
from .rules import scalar_rule
from .test_elementwise import from_bf16, spec, to_bf16

rng = np.random.default_rng(4321)
SPLIT = SimpleNamespace(max_workgroup_count=(3, 65535, 65535))  # forces many dispatches


def build(s, caps=None):
    b = generate_elementwise(s, caps, scalar_rule)
    validate(b.words, b.name)
    return b


def build_multi(s, caps=None):
    b = generate_elementwise_multi(s, caps, scalar_rule)
    validate(b.words, b.name)
    return b


@pytest.fixture(scope="module")
def run_inplace(run_kernel):
    """`run_inplace(binary, arrays, out_specs, alias)`: as run_kernel, but output k is bound to
    the buffer of input alias[k] (and returns its final contents)."""
    from alpha_jit.runtime.device import get_device
    from alpha_jit.runtime.executor import DispatchCmd

    def run(binary, arrays, out_specs, alias):
        dev = get_device()
        pipeline = dev.pipeline(binary)
        regions = []
        arrays = [np.ascontiguousarray(a) for a in arrays]
        try:
            for a in arrays:
                regions.append(dev.alloc(a.nbytes))
                dev.upload(regions[-1], a)
            outs = [np.empty(tuple(shape), np.dtype(dt)) for shape, dt in out_specs]
            fresh = [dev.alloc(o.nbytes) for k, o in enumerate(outs) if k not in alias]
            it = iter(fresh)
            out_regions = [regions[alias[k]] if k in alias else next(it)
                           for k in range(len(outs))]
            regions.extend(fresh)
            commands = [DispatchCmd(pipeline, regions[:len(arrays)] + out_regions, d)
                        for d in binary.dispatches]
            assert len(commands) == 1, "one dispatch: no barriers needed between them"
            recording = dev.record(commands, name=f"run_inplace:{binary.name}")
            dev.wait(recording.submit())
            recording.release()
            for o, r in zip(outs, out_regions, strict=True):
                o[...] = np.frombuffer(dev.download(r, o.nbytes), o.dtype).reshape(o.shape)
            return outs
        finally:
            for r in regions:
                dev.free(r)

    return run


# ---- flat ---------------------------------------------------------------------------------

RAGGED = (263, 251)  # 66013 elements: over the unroll threshold, not a multiple of 256 * 4
assert RAGGED[0] * RAGGED[1] >= UNROLL_MIN_ELEMENTS and RAGGED[0] * RAGGED[1] % 1024


@pytest.mark.parametrize("caps", [None, SPLIT], ids=["one_dispatch", "split"])
def test_unrolled_strided_broadcast_ragged(run_kernel, caps):
    rows, cols = RAGGED
    # in0 contiguous; in1 read transposed from a (cols, rows) buffer at offset 3; in2 a row
    # vector, in3 a column vector (broadcasts); iota along both axes
    s = spec("unroll_strided", RAGGED,
             (("f32", (cols, 1), 0), ("f32", (1, rows), 3), ("f32", (0, 1), 0),
              ("f32", (1, 0), 0)),
             (("mul", "f32", (), (("in", 0), ("in", 1))),
              ("add", "f32", (), (("e", 0), ("in", 2))),
              ("cast", "f32", (("dtype", "f32"),), (("iota", 1),)),
              ("sub", "f32", (), (("e", 1), ("in", 3))),
              ("add", "i32", (), (("iota", 0), ("iota", -1)))),
             (("f32", 3), ("f32", 2), ("i32", 4)))
    b = build(s, caps)
    assert b.notes["variant"] == "flat x256 u4" and b.notes["elements"] == rows * cols
    if caps is SPLIT:
        assert len(b.dispatches) == -(-rows * cols // (1024 * 3))
        assert all(d.groups[0] <= 3 for d in b.dispatches)
    a = rng.standard_normal(RAGGED).astype(np.float32)
    t = rng.standard_normal(cols * rows + 3).astype(np.float32)
    r, c = rng.standard_normal(cols).astype(np.float32), rng.standard_normal(rows).astype(
        np.float32)
    outs = run_kernel(b, [a, t, r, c], [(RAGGED, np.float32), (RAGGED, np.float32),
                                        (RAGGED, np.int32)])
    ref = reference_elementwise(s, [a, t, r, c], scalar_rule)
    for got, want in zip(outs, ref, strict=True):
        np.testing.assert_array_equal(got, want)


def test_unrolled_16bit_uses_eight_per_thread(run_kernel):
    n = 3 * 65536 + 5
    s = spec("unroll_bf16", (n,), (("bf16", (1,), 0), ("bf16", (1,), 0)),
             (("mul", "f32", (), (("in", 0), ("in", 1))),), (("bf16", 0),))
    b = build(s)
    assert b.notes["variant"] == "flat x256 u8"
    x, y = (to_bf16(rng.standard_normal(n)) for _ in range(2))
    (out,) = run_kernel(b, [x, y], [((n,), np.uint16)])
    np.testing.assert_array_equal(out, to_bf16(from_bf16(x) * from_bf16(y)))


def test_unrolled_padded_input(run_kernel):
    # out = pad(x) + y: x (250, 240) sits at rows 7.., cols 11.. of the (263, 251) grid
    rows, cols = RAGGED
    lo = (7, 11)
    xs = (250, 240)
    window = ((lo[0], lo[0] + xs[0]), (lo[1], lo[1] + xs[1]))
    off = -(lo[0] * xs[1] + lo[1])
    s = spec("unroll_pad", RAGGED, (("f32", (xs[1], 1), off, window), ("f32", (cols, 1), 0)),
             (("add", "f32", (), (("in", 0), ("in", 1))),), (("f32", 0),))
    b = build(s)
    assert "u4" in b.notes["variant"]
    x = rng.standard_normal(xs).astype(np.float32)
    y = rng.standard_normal(RAGGED).astype(np.float32)
    (out,) = run_kernel(b, [x, y], [(RAGGED, np.float32)])
    want = y.copy()
    want[lo[0]:lo[0] + xs[0], lo[1]:lo[1] + xs[1]] += x
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_unrolled_in_place(run_inplace, dtype):
    # x <- x * y + 0.5, written over x's own buffer (an Aliased in-place kernel)
    n = 65536 + 37
    s = KernelSpec("elementwise", f"unroll_inplace_{dtype}", (
        ("shape", (n,)), ("inputs", ((dtype, (1,), 0), (dtype, (1,), 0))),
        ("exprs", (("mul", "f32", (), (("in", 0), ("in", 1))),
                   ("add", dtype, (), (("e", 0), ("const", 0.5, "f32"))))),
        ("outputs", ((dtype, 1),)), ("aliased", True)))
    b = build(s)
    assert b.notes["variant"] == f"flat x256 u{8 if dtype == 'bf16' else 4}"
    if dtype == "f32":
        x, y = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
        (out,) = run_inplace(b, [x, y], [((n,), np.float32)], {0: 0})
        want = reference_elementwise(s, [x, y], scalar_rule)[0]
        np.testing.assert_array_equal(out, want)
    else:
        x, y = (to_bf16(rng.standard_normal(n)) for _ in range(2))
        (out,) = run_inplace(b, [x, y], [((n,), np.uint16)], {0: 0})
        prod = from_bf16(x) * from_bf16(y)  # an f32 node: not rounded
        np.testing.assert_array_equal(out, to_bf16(prod + np.float32(0.5)))


# ---- multi-tensor -------------------------------------------------------------------------

# an AdamW-like update over many tensors of odd sizes, one scalar shared by all
MULTI_EXPRS = (("mul", "f32", (), (("in", 0), ("in", 2))),
               ("mul", "f32", (), (("in", 1), ("const", 0.25, "f32"))),
               ("add", "f32", (), (("e", 0), ("e", 1))),
               ("sub", "f32", (), (("in", 0), ("e", 2))))
MULTI_OUTPUTS = (("f32", 3),)


def _strides(shape):
    return tuple(int(np.prod(shape[d + 1:])) for d in range(len(shape)))


def _multi(name, shapes, packed, aliased=False):
    """(spec, arrays, out_specs, reference outputs) of the update over `shapes`. Bindings: the
    scalar; then every x in one buffer and every m in another at offsets (`packed`: a
    deduplicated read shared by all segments), or an x and an m buffer per segment; then one
    output per segment."""
    nseg = len(shapes)
    sizes = [int(np.prod(s)) for s in shapes]
    arrays = [rng.standard_normal(1).astype(np.float32)]
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ms = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if packed:
        arrays += [np.concatenate([x.reshape(-1) for x in xs]),
                   np.concatenate([m.reshape(-1) for m in ms])]
        offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        where = [((1, int(o)), (2, int(o))) for o in offs]
    else:
        arrays += [a for x, m in zip(xs, ms, strict=True) for a in (x, m)]
        where = [((1 + 2 * k, 0), (2 + 2 * k, 0)) for k in range(nseg)]
    nin = len(arrays)
    segments, want = [], []
    for k, shape in enumerate(shapes):
        st, bc = _strides(shape), (0,) * len(shape)
        (xb, xo), (mb, mo) = where[k]
        segments.append((shape, ((xb, "f32", st, xo), (mb, "f32", st, mo), (0, "f32", bc, 0)),
                         (nin + k,)))
        flat = spec("seg", shape, (("f32", st, 0), ("f32", st, 0), ("f32", bc, 0)),
                    MULTI_EXPRS, MULTI_OUTPUTS)
        want += reference_elementwise(flat, [xs[k], ms[k], arrays[0]], scalar_rule)
    params = (("bindings", tuple([("f32", False)] * nin + [("f32", True)] * nseg)),
              ("exprs", MULTI_EXPRS), ("outputs", MULTI_OUTPUTS), ("segments", tuple(segments)))
    if aliased:
        params += (("aliased", True),)
    s = KernelSpec("elementwise_multi", name, params)
    return s, arrays, [(shape, np.float32) for shape in shapes], want


SHAPES_20 = [(1,), (3,), (17,), (255,), (257,), (1023,), (1025,), (7, 13), (4099,), (31, 33),
             (1,), (40001,), (5,), (2, 3, 5), (9999,), (2047,), (129, 3), (12289,), (11,), (77,)]


@pytest.mark.parametrize("shapes,unroll,caps", [
    (SHAPES_20, 4, None),
    (SHAPES_20, 4, SPLIT),
    ([(1,), (300,), (7, 9), (2,), (1000,)], 1, None),  # small: one element per thread
], ids=["twenty_segments", "twenty_split", "small"])
def test_multi_tensor_segments(run_kernel, shapes, unroll, caps):
    s, arrays, out_specs, want = _multi(f"multi_{len(shapes)}_{caps is None}", shapes, True)
    b = build_multi(s, caps)
    total = sum(int(np.prod(s)) for s in shapes)
    assert total >= UNROLL_MIN_ELEMENTS or unroll == 1
    assert b.notes["elements"] == total
    assert b.notes["variant"] == f"multi-tensor x{len(shapes)} flat x256 u{unroll}"
    block = 256 * unroll  # every segment starts at a whole block
    padded = sum(-(-int(np.prod(s)) // block) * block for s in shapes)
    assert sum(d.groups[0] for d in b.dispatches) * block == padded
    if caps is SPLIT:
        assert len(b.dispatches) > 1 and all(d.groups[0] <= 3 for d in b.dispatches)
    outs = run_kernel(b, arrays, out_specs)
    for got, w in zip(outs, want, strict=True):
        np.testing.assert_array_equal(got, w)


def test_multi_tensor_in_place(run_inplace):
    # every segment writes its update over its own x (the optimizer's parameter update)
    shapes = [(3,), (40001,), (255,), (30011,), (1,)]
    s, arrays, out_specs, want = _multi("multi_inplace", shapes, False, aliased=True)
    b = build_multi(s)
    assert "u4" in b.notes["variant"]
    outs = run_inplace(b, arrays, out_specs, {k: 1 + 2 * k for k in range(len(shapes))})
    for got, w in zip(outs, want, strict=True):
        np.testing.assert_array_equal(got, w)


# ---- cross-entropy gradient -----------------------------------------------------------------

CE_ROWS, CE_CLASSES, CE_IGNORE = 300, 257, 3  # 77100 elements: unrolled and ragged


def _ce_spec(dtype, aliased=False, offsets=(5, 2, 4, 6), classes=CE_CLASSES):
    zo, yo, ro, go = offsets
    params = (("rows", CE_ROWS), ("classes", classes), ("ignore", (True, CE_IGNORE)),
              ("z", (dtype, zo)), ("y", yo), ("r", ro), ("g", go), ("out_dtype", dtype))
    return KernelSpec("ce_bwd", f"ce_bwd_{dtype}_{aliased}",
                      params + ((("aliased", True),) if aliased else ()))


def _ce_inputs(offsets=(5, 2, 4, 6), classes=CE_CLASSES):
    zo, yo, ro, go = offsets
    z = (rng.standard_normal((CE_ROWS, classes)) * 3).astype(np.float32)
    z[7, 2], z[8, classes - 1], z[9, 3] = np.nan, np.inf, -np.inf
    y = rng.integers(0, classes, CE_ROWS).astype(np.int32)
    y[::7] = CE_IGNORE  # ignored rows
    y[5] = classes + 4  # a bad label: NaN gradient row
    lse = np.log(np.exp(z.astype(np.float64)).sum(1)).astype(np.float32)
    lse[7:10] = 1.5  # rows with a NaN / inf / -inf logit: a finite lse, as a test input
    r = np.stack([rng.standard_normal(CE_ROWS).astype(np.float32), lse], 1)
    g = rng.standard_normal((CE_ROWS, 2)).astype(np.float32)
    g[::4, 1] = 0.0  # a zero lse cotangent
    pad = lambda a, k: np.concatenate(  # noqa: E731
        [rng.standard_normal(k).astype(a.dtype), a.reshape(-1)])
    return z, y, r, g, [pad(z, zo), np.concatenate([np.zeros(yo, np.int32), y]), pad(r, ro),
                        pad(g, go)]


def _ce_reference(z, y, r, g):
    classes = z.shape[1]
    with np.errstate(invalid="ignore"):
        prob = np.exp(z.astype(np.float64) - r[:, 1:])
        keep = (y != CE_IGNORE)[:, None]
        valid = ((y >= 0) & (y < classes))[:, None]
        coef = np.where(keep, np.where(valid, g[:, :1], np.nan), 0.0)
        dz = np.where(keep, prob * coef, 0.0) + np.where(g[:, 1:] == 0, 0.0, prob * g[:, 1:])
        return dz - np.where(np.arange(classes)[None] == y[:, None], coef, 0.0)


def _check_ce(got, want, rtol):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    assert np.isnan(got[5]).all() and np.isnan(got[7]).any()
    assert not got[::28].any()  # ignored rows with a zero lse cotangent: exactly 0
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=rtol, atol=1e-6)


def test_ce_bwd_unrolled(run_kernel):
    b = generate_ce_bwd(_ce_spec("f32"))
    validate(b.words, b.name)
    assert b.notes["variant"] == "flat x256 u4"
    z, y, r, g, arrays = _ce_inputs()
    (got,) = run_kernel(b, arrays, [((CE_ROWS, CE_CLASSES), np.float32)])
    _check_ce(got, _ce_reference(z, y, r, g), 1e-5)


def test_ce_bwd_bf16_split(run_kernel):
    b = generate_ce_bwd(_ce_spec("bf16"), SPLIT)
    validate(b.words, b.name)
    assert b.notes["variant"] == "flat x256 u8" and len(b.dispatches) > 1
    z, y, r, g, arrays = _ce_inputs()
    zb = to_bf16(arrays[0])
    z = from_bf16(zb[5:]).reshape(z.shape)
    (got,) = run_kernel(b, [zb, *arrays[1:]], [((CE_ROWS, CE_CLASSES), np.uint16)])
    _check_ce(from_bf16(got), _ce_reference(z, y, r, g), 8e-3)


def test_ce_bwd_in_place(run_inplace):
    offsets = (0, 2, 4, 6)  # dz over z's own buffer: z must start at element 0
    b = generate_ce_bwd(_ce_spec("f32", aliased=True, offsets=offsets))
    validate(b.words, b.name)
    z, y, r, g, arrays = _ce_inputs(offsets)
    (got,) = run_inplace(b, arrays, [((CE_ROWS, CE_CLASSES), np.float32)], {0: 0})
    _check_ce(got, _ce_reference(z, y, r, g), 1e-5)


@pytest.mark.parametrize("dtype,classes,aliased", [
    ("f32", 520, False), ("bf16", 2056, False), ("f32", 4100, True), ("bf16", 5000, True)])
def test_ce_bwd_rows_as_vectors(run_kernel, run_inplace, dtype, classes, aliased):
    """Where z and dz share bf16 or f32 and rows allow 16-byte vectors, a row at a time, 8 bf16
    or 4 f32 per load and store (by a subgroup, or a workgroup past 4096 classes; in place
    too), with NaN, inf, ignored rows and a bad label as the reference; the same bits as the
    flat grid, which an odd offset of z selects."""
    width = 8 if dtype == "bf16" else 4
    offsets = (0 if aliased else 2 * width, 2, 4, 6)
    b = generate_ce_bwd(_ce_spec(dtype, aliased, offsets, classes))
    validate(b.words, b.name)
    assert b.notes["variant"].endswith(f"{width} per load"), b.notes["variant"]
    z, y, r, g, arrays = _ce_inputs(offsets, classes)
    out = [((CE_ROWS, classes), np.uint16 if dtype == "bf16" else np.float32)]
    if dtype == "bf16":
        arrays[0] = to_bf16(arrays[0])
        z = from_bf16(arrays[0][offsets[0]:]).reshape(z.shape)
    if aliased:
        (got,) = run_inplace(b, arrays, out, {0: 0})
    else:
        (got,) = run_kernel(b, arrays, out)
    flat_offsets = (offsets[0] + 1, *offsets[1:])
    flat = generate_ce_bwd(_ce_spec(dtype, False, flat_offsets, classes))
    assert "per load" not in flat.notes["variant"]
    zf = np.concatenate([arrays[0][:1], arrays[0]])  # the same z one element later
    (want_bits,) = run_kernel(flat, [zf, *arrays[1:]], out)
    np.testing.assert_array_equal(got.view(np.uint32 if dtype == "f32" else np.uint16),
                                  want_bits.view(np.uint32 if dtype == "f32" else np.uint16))
    got = from_bf16(got) if dtype == "bf16" else got
    _check_ce(got, _ce_reference(z, y, r, g), 8e-3 if dtype == "bf16" else 1e-5)


def test_ce_bwd_keeps_the_flat_grid_where_vectors_do_not_fit():
    """Mixed dtypes, f16, a row length or an offset off the vector width, or rows shorter
    than a vector per thread of the row's owner (16 bf16 classes: 2 vectors for 8 or 32
    lanes): the flat grid."""
    for dtype, out_dtype, classes, zo in (("bf16", "f32", 264, 0), ("f16", "f16", 264, 0),
                                          ("bf16", "bf16", 260, 0), ("f32", "f32", 260, 2),
                                          ("bf16", "bf16", 16, 0)):
        spec = _ce_spec(dtype, False, (zo, 2, 4, 6), classes)
        spec = KernelSpec("ce_bwd", spec.name, tuple(
            (k, out_dtype if k == "out_dtype" else v) for k, v in spec.params))
        assert generate_ce_bwd(spec).notes["variant"].startswith("flat"), (dtype, classes, zo)


def test_in_place_vector_views_are_aliased_and_writable_only_where_allowed():
    """An in-place ce_bwd reads z and writes dz, which may be the same memory, through 16-byte
    views: every storage-buffer variable of the module is decorated Aliased and none is
    NonWritable (a compiler could otherwise keep a stale value); a writable view of a
    read-only binding is refused."""
    import re

    from alpha_jit.codegen_spirv import tools
    from alpha_jit.codegen_spirv.dsl import KernelBuilder

    b = generate_ce_bwd(_ce_spec("bf16", aliased=True, offsets=(0, 2, 4, 6), classes=5000))
    assert b.notes["variant"].endswith("8 per load")
    text = tools.disassemble(b.words, b.name)
    variables = re.findall(r"(%\w+) = OpVariable %\w+ StorageBuffer", text)
    assert len(variables) == 7  # z, y, r, g, out and the two views
    for var in variables:
        assert re.search(rf"OpDecorate {var} Aliased", text), var
    assert "NonWritable" not in text
    kb = KernelBuilder("views", 64, None)
    ro = kb.buffer("x", "f32", writable=False)
    with pytest.raises(TypeError, match="writable view of read-only binding 0"):
        kb.buffer_view(ro, "f32x4", writable=True)
