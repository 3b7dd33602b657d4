"""Cross-entropy over rows of logits, forward and backward (the ops `cross_entropy_rows` and
`cross_entropy_rows_grad` of `ir/ops/rowwise.py`), and their lowerings.

Why: one kernel per direction, and no one-hot [rows, classes] is ever materialised. The
forward owns a row per workgroup (or subgroup, for short rows: rowwise._Rows), reads it once as
16-byte vectors where aligned and keeps a one-pass logsumexp; it saves each row's (loss, lse).
The backward needs no reduction: from the saved lse, softmax(z) - onehot(y) is formed per
element, a row at a time as 16-byte vectors where z and dz allow, else on a flat grid.

Families (params as (key, value) pairs; every operand is contiguous, `(dtype, offset)`):
    ce_fwd:     rows, classes, ignore (bool, int), z, y     -> [rows, 2] f32 (loss, lse)
    ce_bwd:     rows, classes, ignore, z, y, r, g, out_dtype -> dz [rows, classes]
Bindings: operands in that order, then the output. r/g offsets are element offsets of f32
[rows, 2] buffers; y is i32.
"""

from __future__ import annotations

from ..dsl import KernelBuilder, Value
from ..kernel import KernelBinary, KernelSpec
from ..lower import _Lowerer, register_kernel_lowering
from ..scalar import compute_dtype
from .elementwise import (
    VECTOR_VIEW,
    FlatGrid,
    local_size_for,
    pack_vector,
    storage_dtype,
    unroll_for,
)
from .rowwise import _NAN, _operand, _Rows, fits_i32

FAMILIES = {"ce_fwd": "generate_ce_fwd", "ce_bwd": "generate_ce_bwd"}


def _label(kb: KernelBuilder, p: dict, y: Value, classes: int) -> tuple[Value, Value]:
    """(keep, valid): the row counts (not ignore_index), the label is in [0, classes)."""
    has_ignore, ignore = p["ignore"]
    keep = (y != int(ignore)) if has_ignore else kb.bool_(True)
    return keep, (y >= 0) & (y < classes)


def generate_ce_fwd(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """out[row] = (loss, lse): loss = lse - z[y] (0 if ignored, NaN for a bad label)."""
    classes = int(dict(spec.params)["classes"])
    r = _Rows(spec, caps, classes)
    kb = r.kb
    z, zo = r.operand("z")
    y, yo = r.operand("y", "i32")
    out = kb.buffer("out", "f32", writable=True)
    r.start()
    with r.rows_loop() as row:
        base = row * classes + zo
        load = lambda j: kb.cast(z.load(base + j), "f32")  # noqa: E731
        vec = r.row_vectors("z", z, kb.cast(base, "u32"))
        count, zv = vec or (classes, lambda j: [load(j)])
        lse = r.logsumexp(count, zv)
        with kb.if_(r.lid == 0):
            lab = y.load(row + yo)
            keep, valid = _label(kb, r.p, lab, classes)
            picked = load(kb.select(valid, lab, kb.i32(0)))
            nan = kb.bitcast(kb.u32(_NAN), "f32")
            loss = kb.select(keep, kb.select(valid, lse - picked, nan), kb.f32(0.0))
            out.store(row * 2, loss)
            out.store(row * 2 + 1, lse)
    return r.finish({"classes": classes}, f"{classes // count} per load" if vec else None)


def generate_ce_bwd(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """dz = softmax(z) * (coef + g_lse) - onehot(y) * coef, coef = g_loss (0 if ignored, NaN
    for a bad label), softmax from the saved lse, no reduction. Where z and dz share a dtype
    whose rows allow 16-byte vectors (`_Rows.vector_width`, a vector per thread at least), a
    row at a time, each row's label, lse and cotangents loaded once and 8 bf16 (4 f32)
    elements per load and store: gpt2's
    (8192 x 50304 bf16) took 0.90 ms on the H200 as a flat grid, which spends a u32 division
    and four row loads on every element. Else a flat grid of elements, a few per thread
    (`FlatGrid`). Either way the thread that loads an element stores it (dz may take z's
    memory), and every element is the same expression (`_ce_dz`): the same bits."""
    p = dict(spec.params)
    rows, classes = int(p["rows"]), int(p["classes"])
    if p["z"][0] == p["out_dtype"] and fits_i32(spec, rows * classes):
        r = _Rows(spec, caps, classes)
        # a vector per thread at least: shorter rows keep the flat grid, which has no idle lanes
        if r.vector_width("z") and classes // r.vector_width("z") >= r.stride:
            return _ce_bwd_rows(r)
    n = rows * classes
    grid = FlatGrid(local_size_for(caps), unroll_for(n, (p["z"][0], p["out_dtype"])))
    if n + max(int(p["z"][1]), grid.block) >= 2**32:  # u32 indices, the last block's included
        raise ValueError(f"{spec.name}: {rows}x{classes} logits exceed the u32 index range")
    kb = KernelBuilder(spec.name, grid.local, caps)
    z, y, rr, g, out = _ce_bwd_bindings(kb, p)
    ct = compute_dtype(storage_dtype(p["out_dtype"]))
    zo, yo, ro, go = int(p["z"][1]), int(p["y"]), int(p["r"]), int(p["g"])
    pc = kb.push_constants([("count", "u32"), ("base", "u32")])
    lanes = grid.lanes(kb, grid.block_start(kb, pc["base"]), n, pc["count"])
    loads = []
    for lane in lanes:  # every element's loads first: dz may take z's memory
        row = kb.cast(lane.at / classes, "i32")
        col = kb.cast(lane.at % classes, "i32")
        zv = kb.cast(z.load(lane.at + zo), "f32")
        loads.append((col, y.load(row + yo), zv, rr.load(row * 2 + 1 + ro),
                      g.load(row * 2 + go), g.load(row * 2 + 1 + go)))
    for lane, (j, lab, zv, lse, g0, g1) in zip(lanes, loads, strict=True):
        dz = _ce_dz(kb, _ce_row(kb, p, classes, lab, lse, g0, g1), zv, j)
        with kb.when(lane.ok):
            out.store(lane.at, kb.cast(dz, ct))
    return kb.binary(spec, grid.dispatches(n, caps), notes={
        "rows": rows, "classes": classes, "variant": grid.variant})


def _ce_bwd_bindings(kb: KernelBuilder, p: dict) -> tuple:
    """z, y, r, g, out: ce_bwd's bindings, in order."""
    kb.aliased = bool(p.get("aliased"))  # dz may take z's memory
    return (kb.buffer("z", storage_dtype(p["z"][0]), writable=False),
            kb.buffer("y", "i32", writable=False), kb.buffer("r", "f32", writable=False),
            kb.buffer("g", "f32", writable=False),
            kb.buffer("out", storage_dtype(p["out_dtype"]), writable=True))


def _ce_row(kb: KernelBuilder, p: dict, classes: int, lab: Value, lse: Value, g0: Value,
            g1: Value) -> tuple:
    """What every element of a row shares: (label, lse, coef, g_lse, keep)."""
    keep, valid = _label(kb, p, lab, classes)
    coef = kb.select(keep, kb.select(valid, g0, kb.bitcast(kb.u32(_NAN), "f32")), kb.f32(0.0))
    return lab, lse, coef, g1, keep


def _ce_dz(kb: KernelBuilder, row: tuple, zv: Value, j: Value) -> Value:
    """dz of element (column j, logit zv) of a row (`_ce_row`), f32."""
    lab, lse, coef, g1, keep = row
    zero = kb.f32(0.0)
    prob = kb.exp(zv - lse)
    # an ignored row and a zero lse cotangent contribute nothing, even through a NaN softmax
    dz = kb.select(keep, prob * coef, zero) + kb.select(g1 == 0.0, zero, prob * g1)
    return dz - kb.select(j == lab, coef, zero)


def _ce_bwd_rows(r: _Rows) -> KernelBinary:
    """ce_bwd a row at a time, 16-byte vectors of z in and of dz out (`generate_ce_bwd`)."""
    kb, p, classes = r.kb, r.p, r.dim
    z, y, rr, g, out = _ce_bwd_bindings(kb, p)
    zo, yo, ro, go = int(p["z"][1]), int(p["y"]), int(p["r"]), int(p["g"])
    width = r.vector_width("z")
    dst = kb.buffer_view(out, VECTOR_VIEW[p["out_dtype"]], writable=True)
    r.start()
    with r.rows_loop() as row:
        shared = _ce_row(kb, p, classes, y.load(row + yo), rr.load(row * 2 + 1 + ro),
                         g.load(row * 2 + go), g.load(row * 2 + 1 + go))
        base = kb.cast(row * classes, "u32")
        count, values = r.row_vectors("z", z, base + zo)
        with kb.loop(r.lid, count, r.stride) as i:
            j0 = i * width
            dz = [_ce_dz(kb, shared, v, j0 + c) for c, v in enumerate(values(i))]
            dst.store(base / width + kb.cast(i, "u32"), pack_vector(kb, p["out_dtype"], dz))
    return r.finish({"classes": classes}, f"{width} per load")


# ---- lowering ------------------------------------------------------------------------------
def _ignore(lw: _Lowerer, n: int) -> tuple[bool, int]:
    ii = lw.g.attrs(n)["ignore_index"]
    return (ii is not None, 0 if ii is None else int(ii))


@register_kernel_lowering("cross_entropy_rows")
def _lower_ce(lw: _Lowerer, n: int) -> None:
    g = lw.g
    z, y = g.args(n)
    rows, classes = g.shape(z)
    (zd, zb), (yd, yb) = _operand(lw, z, n), _operand(lw, y, n)
    params = (("rows", rows), ("classes", classes), ("ignore", _ignore(lw, n)), ("z", zd),
              ("y", yd[1]))
    lw._emit("ce_fwd", f"cross_entropy_{classes}", params, [zb, yb], [n], [n], n)


@register_kernel_lowering("cross_entropy_rows_grad")
def _lower_ce_grad(lw: _Lowerer, n: int) -> None:
    g = lw.g
    args = g.args(n)
    rows, classes = g.shape(args[0])
    (zd, zb), (yd, yb), (rd, rb), (gd, gb) = (_operand(lw, a, n) for a in args)
    params = (("rows", rows), ("classes", classes), ("ignore", _ignore(lw, n)), ("z", zd),
              ("y", yd[1]), ("r", rd[1]), ("g", gd[1]), ("out_dtype", g.dtype(n).name))
    # the thread that reads an element of z writes that element of dz: dz may take z's memory
    pairs = lw.inplace_pairs((rows, classes), [(zb, (classes, 1), zd[1]), (yb, None, 0),
                                               (rb, None, 0), (gb, None, 0)], [(n, {0})])
    if pairs:
        params += (("aliased", True),)
    lw._emit("ce_bwd", f"cross_entropy_grad_{classes}", params, [zb, yb, rb, gb], [n], [n], n,
             inplace=pairs)


