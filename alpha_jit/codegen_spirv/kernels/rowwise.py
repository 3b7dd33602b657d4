"""Fused row kernels: LayerNorm / RMSNorm forward and backward (the norm ops of
`ir/ops/rowwise.py`), their lowerings, and the row machinery (`_Rows`) that cross_entropy.py
and rowwise_regs.py build on.

Why: each is one kernel per direction instead of a chain of reductions and elementwise kernels.
A row of at most SUBGROUP_ROW_MAX elements is owned by one subgroup (several per workgroup) and
reduced by subgroup operations alone, where the device's subgroup size is fixed or can be
pinned (norm_dx excepted: measured slower); longer rows (or other devices) by a workgroup,
reduced through subgroup operations and shared memory (`reduction._WorkgroupReducer`: no
subgroup size assumed). Either way the grid strides over the
rows when they outnumber the workgroups allowed, a row is re-read per pass (mean, variance,
output) rather than held in registers, sums are f32 and the max propagates NaN. Parameter
gradients of a norm (dw, db) are one column reduction: each workgroup owns a strip of columns,
its threads stride over rows, and a fixed-order shared-memory fold finishes, so the sums are
deterministic (no atomics, no second pass). Rows that fit a subgroup's lanes as 16-byte
vectors are held in registers instead (rowwise_regs.py).

Families (params as (key, value) pairs; every operand is contiguous, `(dtype, offset)`):
    norm_fwd:   rows, dim, rms, eps, x, w[, b], out_dtype[, stats_out]
                                                            -> out [rows, dim][, stats]
    norm_stats: rows, dim, rms, eps, x                      -> out [rows, 2] f32 (mean, rstd)
    norm_dx:    rows, dim, rms, x, w, g, stats, out_dtype   -> dx [rows, dim]
    norm_dwb:   rows, dim, rms, bias, x, g, stats           -> [1 or 2, dim] f32 (dw[, db])
Bindings: operands in that order, then the output. stats offsets are element offsets of f32
[rows, 2] buffers.
"""

from __future__ import annotations

import math
from functools import reduce

from ... import dtypes
from ...schedule import epilogue
from ..dsl import Buffer as Binding
from ..dsl import KernelBuilder, Value, cap, max_groups_x
from ..kernel import Dispatch, KernelBinary, KernelSpec
from ..lower import Buffer, _Lowerer, register_kernel_lowering
from ..scalar import ScalarEmitter, compute_dtype, nan_minmax, subgroup_max
from . import rowwise_regs
from .column_strips import emit_column_sums, strip_layout
from .elementwise import (
    VECTOR_VIEW,
    VECTOR_WIDTH,
    EpilogueStore,
    ScalarRule,
    local_size_for,
    storage_dtype,
    unpack_vector,
)
from .reduction import _WorkgroupReducer

FAMILIES = {"norm_fwd": "generate_norm_fwd", "norm_stats": "generate_norm_stats",
            "norm_dx": "generate_norm_dx", "norm_dwb": "generate_norm_dwb"}
_NAN = 0x7FC00000


def fits_i32(spec: KernelSpec, numel: int) -> bool:
    """Whether `numel` elements (and the [rows, 2] statistics) index in i32, as these kernels
    do."""
    return numel + 2 * int(dict(spec.params).get("rows", 0)) < 2**31


def _check_i32(spec: KernelSpec, numel: int) -> None:
    # element indices are i32 in these kernels: a bigger tensor must not wrap around quietly
    if not fits_i32(spec, numel):
        raise ValueError(f"{spec.name}: {numel} elements exceed the 2**31 index range of the "
                         "row kernels")


def _row_local(dim: int, caps: object) -> int:
    """Threads per row: enough to cover short rows without idling most of the group."""
    want = 256 if dim >= 1024 else (128 if dim >= 256 else 64)
    return local_size_for(caps, want)


# rows of at most this many elements are each owned by one subgroup (reduced by subgroup
# operations alone: no barrier, no shared memory); longer ones by a workgroup
SUBGROUP_ROW_MAX = 4096
_SUBGROUP_ROWS_LOCAL = 128  # threads per workgroup of subgroup-owned rows


def row_subgroup(dim: int, caps: object) -> int | None:
    """The lanes of the subgroup that owns a row of `dim` (32, or the device's only size), or
    None where rows are owned by workgroups. The width is pinned and every subgroup required
    full (size control and computeFullSubgroups): a driver may report a size it does not run,
    or start partial subgroups, and a row's lanes and its slot in the workgroup must be
    exactly what the kernel assumes."""
    if dim > SUBGROUP_ROW_MAX or not (cap(caps, "subgroup_size_control", False)
                                      and cap(caps, "compute_full_subgroups", False)):
        return None
    lo, hi = int(cap(caps, "min_subgroup_size", 0)), int(cap(caps, "max_subgroup_size", 0))
    lanes = 32 if lo <= 32 <= hi else (lo if lo == hi else 0)
    return lanes if 0 < lanes <= _SUBGROUP_ROWS_LOCAL else None


class _Rows:
    """A row kernel: bindings, the row loop, and row reductions. A row of at most
    SUBGROUP_ROW_MAX elements belongs to one subgroup (several rows per workgroup) unless the
    kernel asks otherwise: no barriers (gpt2's LayerNorm forward on the H200: 0.58 -> 0.47 ms
    per step). Longer rows (cross-entropy's classes) belong to a workgroup."""

    def __init__(self, spec: KernelSpec, caps: object, dim: int, by_subgroup: bool = True):
        self.p = dict(spec.params)
        _check_i32(spec, int(self.p["rows"]) * dim)
        self.lanes = row_subgroup(dim, caps) if by_subgroup else None
        self.local = _row_local(dim, caps) if self.lanes is None else \
            local_size_for(caps, _SUBGROUP_ROWS_LOCAL)
        self.kb = KernelBuilder(spec.name, self.local, caps)
        self.caps, self.dim, self.spec = caps, dim, spec
        self.em = ScalarEmitter(self.kb)

    @property
    def per_group(self) -> int:
        """Rows a workgroup owns at a time."""
        return 1 if self.lanes is None else max(1, self.local // self.lanes)

    @property
    def stride(self) -> int:
        """Threads over one row (its elements' loop step)."""
        return self.local if self.lanes is None else self.lanes

    def operand(self, key: str, dtype: str | None = None):
        dt, off = self.p[key] if dtype is None else (dtype, self.p[key])
        return self.kb.buffer(key, storage_dtype(dt), writable=False), int(off)

    def start(self) -> None:
        kb = self.kb
        if self.lanes is None:
            self.red = _WorkgroupReducer(kb, self.local, self.caps)  # after the bindings
            self.lid = kb.cast(kb.local_id(0), "i32")
        else:  # the row's lane; the subgroup's row among the workgroup's
            self.lid = kb.cast(kb.subgroup_invocation_id(), "i32")
            self.slot = kb.cast(kb.subgroup_id(), "i32")

    def _reduce(self, op: str, x: Value) -> Value:
        if self.lanes is None:
            return self.red(op, x)
        return subgroup_max(self.kb, x) if op == "max" else self.kb.subgroup_reduce(op, x)

    def elements(self):
        """The loop over this thread's elements of the row."""
        return self.kb.loop(self.lid, self.dim, self.stride)

    def fold(self, op: str, count: int, f) -> Value:
        """op ("add" or "max") over the row of the f32 values f(i) lists, i in [0, count)
        spread over the row's threads; visible to every thread of the row."""
        kb = self.kb
        acc = kb.var("f32", 0.0 if op == "add" else float("-inf"))
        with kb.loop(self.lid, count, self.stride) as i:
            for v in f(i):
                acc.set(acc.get() + v if op == "add" else nan_minmax(kb, "max", acc.get(), v))
        return self._reduce(op, acc.get())

    def logsumexp(self, count: int, f) -> Value:
        """log(sum(exp(x))) over the row's f32 values (f(i) lists vector i's, i in [0, count)),
        in one pass over memory: each thread keeps the running max m of its values and the
        sum s of exp(x - shift(m)), rescaled when m grows; then the row's max M and the sum of
        s * exp(shift(m) - shift(M)). shift(v) is v, or 0 where v is infinite (the numpy
        reference's rule); an empty sum adds 0 whatever its scale (no 0 * inf), and a NaN
        anywhere makes the row NaN. Two passes (the max, then the sums) read gpt2's 50304
        bf16 logits per row twice: 0.37 ms a step on the H200."""
        kb = self.kb
        zero = kb.f32(0.0)

        def shift(v: Value) -> Value:
            return kb.select(kb.isinf(v), zero, v)

        def rescale(total: Value, old: Value, new: Value) -> Value:
            return kb.select(total == 0.0, zero, total * kb.exp(shift(old) - shift(new)))

        m, s = kb.var("f32", float("-inf")), kb.var("f32", 0.0)
        with kb.loop(self.lid, count, self.stride) as i:
            xs = f(i)
            new = reduce(lambda a, b: nan_minmax(kb, "max", a, b), xs, m.get())
            sh = shift(new)
            s.set(reduce(lambda a, x: a + kb.exp(x - sh), xs, rescale(s.get(), m.get(), new)))
            m.set(new)
        top = self._reduce("max", m.get())
        total = self._reduce("add", rescale(s.get(), m.get(), top))
        return self.em.unary("log", total) + shift(top)

    def row_sum(self, f) -> Value:
        """Sum over the row of f(j) (f32), visible to every thread of the row."""
        return self.fold("add", self.dim, lambda j: [f(j)])

    def vector_width(self, key: str) -> int:
        """Elements per 16-byte load of operand `key`'s rows (8 bf16, 4 f32), or 0 where its
        dtype, offset or row length does not allow them."""
        dt, off = self.p[key]
        width = VECTOR_WIDTH.get(dt, 0)
        return width if width and self.dim % width == 0 and int(off) % width == 0 else 0

    def row_vectors(self, key: str, buf: Binding, base: Value):
        """(count, f): the row of operand `key` (binding `buf`) from element `base` as 16-byte
        loads, f(i) listing vector i's elements as f32 (8 bf16 or 4 f32); None where
        `vector_width` is 0. A bf16 row read one element per load ran at 1.6 TB/s (gpt2's
        cross-entropy rows on the H200)."""
        width = self.vector_width(key)
        if not width:
            return None
        kb = self.kb
        view = kb.buffer_view(buf, VECTOR_VIEW[self.p[key][0]])
        first = base / width  # base: a row start plus the offset, both multiples of width
        return self.dim // width, lambda i: unpack_vector(kb, view.load(first + kb.cast(i, "u32")))

    @property
    def groups(self) -> int:
        rows = math.ceil(int(self.p["rows"]) / self.per_group)
        return max(1, min(rows, max_groups_x(self.caps)))

    def rows_loop(self):
        kb, rows, per = self.kb, int(self.p["rows"]), self.per_group
        first = kb.cast(kb.workgroup_id(0), "i32")
        step = kb.cast(kb.num_workgroups(0), "i32")
        if per > 1:
            first, step = first * per + self.slot, step * per
        return kb.loop(first, rows, step, max_trips=math.ceil(rows / (self.groups * per)))

    def finish(self, notes: dict, how: str | None = None) -> KernelBinary:
        """The binary; `how` (e.g. "8 per load") joins the variant's name."""
        groups = self.groups
        owner = f"subgroup per row x{self.lanes}" if self.lanes is not None \
            else f"workgroup per row x{self.local}"
        owner += f", {how}" if how else ""
        notes = {"rows": self.p["rows"], "variant": owner, **notes}
        if self.lanes is not None:  # pinned and full: `row_subgroup`
            notes["required_subgroup_size"] = self.lanes
            notes["full_subgroups"] = True
        return self.kb.binary(self.spec, [Dispatch((groups, 1, 1))], notes=notes)


def _stats(r: _Rows, x, xoff: int, base: Value) -> tuple[Value, Value]:
    """(mean, rstd) of the row at `base` (mean 0 for RMS): two passes, f32."""
    kb, dim = r.kb, r.dim
    load = lambda j: kb.cast(x.load(base + j + xoff), "f32")  # noqa: E731
    square = lambda v: v * v  # noqa: E731
    if r.p["rms"]:
        mean = kb.f32(0.0)
        sq = r.row_sum(lambda j: square(load(j)))
    else:
        mean = r.row_sum(load) / float(dim)
        sq = r.row_sum(lambda j: square(load(j) - mean))
    rstd = r.em.unary("rsqrt", sq / float(dim) + float(r.p["eps"]))
    return mean, rstd


def generate_norm_fwd(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """out = (x - mean) * rstd * w (+ b), per row of `dim` (see the module docstring); the
    row in registers where it fits (rowwise_regs.py)."""
    p = dict(spec.params)
    if rowwise_regs.fits(p, caps, ("x", "w", "b"), [p["out_dtype"]]):
        return rowwise_regs.norm_fwd(spec, caps)
    dim = int(p["dim"])
    r = _Rows(spec, caps, dim)
    kb = r.kb
    x, xo = r.operand("x")
    w, wo = r.operand("w")
    b = r.operand("b") if "b" in r.p else None
    out = kb.buffer("out", storage_dtype(r.p["out_dtype"]), writable=True)
    # the backward's statistics, written here instead of recomputed by a norm_stats kernel
    stats = kb.buffer("stats", "f32", writable=True) if r.p.get("stats_out") else None
    ct = compute_dtype(storage_dtype(r.p["out_dtype"]))
    r.start()
    with r.rows_loop() as row:
        base = row * dim
        mean, rstd = _stats(r, x, xo, base)
        if stats is not None:
            with kb.if_(r.lid == 0):
                stats.store(row * 2, mean)
                stats.store(row * 2 + 1, rstd)
        with r.elements() as j:
            y = (kb.cast(x.load(base + j + xo), "f32") - mean) * rstd * w.load(j + wo)
            if b is not None:
                y = y + b[0].load(j + b[1])
            out.store(base + j, kb.cast(y, ct))
    return r.finish({"dim": dim})


def generate_norm_stats(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """out[row] = (mean, rstd) as f32 (mean 0 for RMS)."""
    dim = int(dict(spec.params)["dim"])
    r = _Rows(spec, caps, dim)
    kb = r.kb
    x, xo = r.operand("x")
    out = kb.buffer("out", "f32", writable=True)
    r.start()
    with r.rows_loop() as row:
        mean, rstd = _stats(r, x, xo, row * dim)
        with kb.if_(r.lid == 0):
            out.store(row * 2, mean)
            out.store(row * 2 + 1, rstd)
    return r.finish({"dim": dim})


def generate_norm_dx(spec: KernelSpec, caps: object = None,
                     scalar_rule: ScalarRule | None = None) -> KernelBinary:
    """dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)) (no mean(g*w) term for RMS);
    an epilogue (the residual gradient's add) may take dx over the (rows, dim) grid. The row
    in registers where it fits (rowwise_regs.py)."""
    p = dict(spec.params)
    ep = p.get("epilogue")
    outs = [dt for dt, _ in ep[2]] if ep is not None else [p["out_dtype"]]
    if rowwise_regs.fits(p, caps, ("x", "w", "g"), outs):
        return rowwise_regs.norm_dx(spec, caps, scalar_rule)
    dim = int(p["dim"])
    # a workgroup per row: by subgroups gpt2's 25 norm_dx kernels took 1.23 ms against 1.03
    # (H200, session 10), where the forward went 0.58 -> 0.47
    r = _Rows(spec, caps, dim, by_subgroup=False)
    kb = r.kb
    x, xo = r.operand("x")
    w, wo = r.operand("w")
    g, go = r.operand("g")
    st, so = r.operand("stats", "f32")
    out = EpilogueStore(kb, r.p, scalar_rule, (int(r.p["rows"]), dim))
    r.start()
    with r.rows_loop() as row:
        base = row * dim
        mean, rstd = st.load(row * 2 + so), st.load(row * 2 + 1 + so)

        def xhat(j: Value) -> Value:
            return (kb.cast(x.load(base + j + xo), "f32") - mean) * rstd

        def dxhat(j: Value) -> Value:
            return kb.cast(g.load(base + j + go), "f32") * w.load(j + wo)

        c2 = r.row_sum(lambda j: dxhat(j) * xhat(j)) / float(dim)
        c1 = kb.f32(0.0) if r.p["rms"] else r.row_sum(dxhat) / float(dim)
        with r.elements() as j:
            inner = dxhat(j) - xhat(j) * c2
            if not r.p["rms"]:
                inner = inner - c1
            out.finish((row, j), base + j, rstd * inner)
    return r.finish({"dim": dim})


def dwb_chunks(rows: int, dim: int, caps: object) -> int:
    """Row chunks of a dw/db reduction (`column_strips.strip_layout`): 1 on a CPU device,
    else enough to fill the GPU."""
    return strip_layout(rows, dim, caps).chunks


def generate_norm_dwb(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """dw[j] = sum_rows g * xhat, db[j] = sum_rows g: a column-strip reduction
    (`column_strips.py`: deterministic). With ("chunks", R > 1) the rows are split in R
    chunks whose sums go to an f32 [R, 1 or 2, dim] binding after `out`."""
    p = dict(spec.params)
    rows, dim, bias = int(p["rows"]), int(p["dim"]), bool(p["bias"])
    _check_i32(spec, rows * dim)
    lay = strip_layout(rows, dim, caps, chunks=int(p.get("chunks", 1)), unroll=p.get("unroll"))
    kb = KernelBuilder(spec.name, (lay.lx, lay.ly, 1), caps)
    x = kb.buffer("x", storage_dtype(p["x"][0]), writable=False)
    g = kb.buffer("g", storage_dtype(p["g"][0]), writable=False)
    st = kb.buffer("stats", "f32", writable=False)
    out = kb.buffer("out", "f32", writable=True)
    ws = kb.buffer("chunk_sums", "f32", writable=True) if lay.chunks > 1 else None
    xo, go, so = int(p["x"][1]), int(p["g"][1]), int(p["stats"])

    def load(i: Value, col: Value) -> list[Value]:
        gv = kb.cast(g.load(i * dim + col + go), "f32")
        xh = (kb.cast(x.load(i * dim + col + xo), "f32") - st.load(i * 2 + so)) \
            * st.load(i * 2 + 1 + so)
        return [gv * xh, gv] if bias else [gv * xh]

    dispatches = emit_column_sums(kb, lay, rows, dim, ["add"] * (2 if bias else 1), load,
                                  lambda k, col, tot: out.store(k * dim + col, tot), ws)
    return kb.binary(spec, dispatches, notes={"rows": rows, "dim": dim,
                                              "variant": lay.variant()})


# ---- lowering ------------------------------------------------------------------------------
def _operand(lw: _Lowerer, a: int, n: int) -> tuple[tuple[str, int], int]:
    """((dtype, element offset), buffer) of a contiguous read of node a by node n."""
    v = lw._contiguous(a, n)
    return (lw.g.dtype(a).name, int(v.offset)), v.base


def _rows_dim(lw: _Lowerer, a: int) -> tuple[int, int]:
    shape = lw.g.shape(a)
    return math.prod(shape[:-1]), shape[-1]


def _lower_norm(lw: _Lowerer, n: int) -> None:
    g = lw.g
    args = g.args(n)
    rows, dim = _rows_dim(lw, args[0])
    ops = [_operand(lw, a, n) for a in args]
    rms = g.op(n) == "rms_norm"
    params: list[tuple] = [("rows", rows), ("dim", dim), ("rms", rms),
                           ("eps", float(g.attrs(n)["eps"])), ("x", ops[0][0]), ("w", ops[1][0])]
    if len(ops) > 2:
        params.append(("b", ops[2][0]))
    params.append(("out_dtype", g.dtype(n).name))
    writes = [n]
    stats = _stats_sibling(lw, n)
    if stats is not None:  # the backward's norm_stats of the same x: written by this kernel
        params.append(("stats_out", True))
        writes.append(stats)
    lw._emit("norm_fwd", f"{g.op(n)}_{dim}", tuple(params), [o[1] for o in ops], writes,
             writes, n)


def _stats_sibling(lw: _Lowerer, n: int) -> int | None:
    """A norm_stats node over the same x, eps and kind as norm n, not lowered yet (it runs
    later: the backward's)."""
    g = lw.g
    x = g.args(n)[0]
    rms, eps = g.op(n) == "rms_norm", float(g.attrs(n)["eps"])
    done = lw.__dict__.setdefault("_norm_stats_done", set())
    for u in g.users(x):
        if g.op(u) == "norm_stats" and u not in done and bool(g.attrs(u)["rms"]) == rms \
                and float(g.attrs(u)["eps"]) == eps:
            done.add(u)
            return u
    return None


register_kernel_lowering("layer_norm")(_lower_norm)
register_kernel_lowering("rms_norm")(_lower_norm)


@register_kernel_lowering("norm_stats")
def _lower_stats(lw: _Lowerer, n: int) -> None:
    done = lw.__dict__.setdefault("_norm_stats_done", set())
    if n in done:
        return  # the forward norm kernel wrote it
    done.add(n)
    g = lw.g
    (x,) = g.args(n)
    rows, dim = _rows_dim(lw, x)
    (xd, xb) = _operand(lw, x, n)
    params = (("rows", rows), ("dim", dim), ("rms", bool(g.attrs(n)["rms"])),
              ("eps", float(g.attrs(n)["eps"])), ("x", xd))
    lw._emit("norm_stats", f"norm_stats_{dim}", params, [xb], [n], [n], n)


@epilogue.register_host("norm_dx")
def _dx_host(lw: _Lowerer, n: int) -> epilogue.Host:
    g = lw.g
    args = g.args(n)
    rows, dim = _rows_dim(lw, args[0])
    (xd, xb), (wd, wb), (gd, gb), (sd, sb) = (_operand(lw, a, n) for a in args)
    params = (("rows", rows), ("dim", dim), ("rms", bool(g.attrs(n)["rms"])), ("x", xd),
              ("w", wd), ("g", gd), ("stats", sd[1]), ("out_dtype", g.dtype(n).name))
    return epilogue.Host("norm_dx", f"norm_dx_{dim}", params, (xb, wb, gb, sb), (rows, dim))


@register_kernel_lowering("norm_dx")
def _lower_dx(lw: _Lowerer, n: int) -> None:
    h = _dx_host(lw, n)
    lw._emit(h.family, h.name, h.params, list(h.reads), [n], [n], n)


@register_kernel_lowering("norm_dwb")
def _lower_dwb(lw: _Lowerer, n: int) -> None:
    g = lw.g
    args = g.args(n)
    rows, dim = _rows_dim(lw, args[0])
    (xd, xb), (gd, gb), (sd, sb) = (_operand(lw, a, n) for a in args)
    bias = bool(g.attrs(n)["bias"])
    params = (("rows", rows), ("dim", dim), ("rms", bool(g.attrs(n)["rms"])),
              ("bias", bias), ("x", xd), ("g", gd), ("stats", sd[1]))
    writes = [n]
    chunks = dwb_chunks(rows, dim, lw.caps)
    if chunks > 1:  # the chunks' partial sums: a temporary only this kernel touches
        ws = next(lw.copy_ids)
        lw.out.buffers[ws] = Buffer(ws, "temp", (chunks, 2 if bias else 1, dim), dtypes.float32)
        params += (("chunks", chunks),)
        writes.append(ws)
    lw._emit("norm_dwb", f"norm_dwb_{dim}", params, [xb, gb, sb], writes, [n], n)
