"""The row-reduction kernel family: sum / max / mean / logsumexp over one strided axis.

Why: softmax, cross-entropy, layer norms and gradient sums all reduce rows. One workgroup owns
one output row (grid-striding over rows when there are more rows than workgroups allowed); its
threads stride along the row accumulating in f32, then combine through subgroup operations and
a small shared array, never assuming a subgroup size (SubgroupSize/NumSubgroups are read at run
time, since lavapipe runs 4..16 lanes and GPUs 32 or 64).

Spec (family "reduction"), params as (key, value) pairs:
    ("mode", "sum" | "max" | "mean" | "lse")
    ("outer_shape", shape), ("outer_strides", strides), ("offset", int)
    ("red_len", R), ("red_stride", s), ("in_dtype", dtype), ("out_dtype", dtype)
out[o] = reduce_r input[offset + sum(o_idx * outer_strides) + r * s], out contiguous over
outer_shape. lse is log(sum(exp(x - max))) + max: two passes over the row, numerically stable.
    ("strips", R) (optional, chosen by the lowering: `strip_chunks`): a float sum/mean/max over
    a strided axis whose outputs are adjacent in memory (a bias gradient: dY [8192, N] summed
    over its rows) runs as a column-strip reduction (`column_strips.py`); with R > 1 row
    chunks an f32 workspace binding follows `out`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..dsl import KernelBuilder, SharedArray, Value, cap, max_groups_x
from ..kernel import Dispatch, KernelBinary, KernelSpec
from ..scalar import compute_dtype, nan_minmax, subgroup_max
from .column_strips import emit_column_sums, strip_layout
from .elementwise import local_size_for, storage_dtype

MODES = ("sum", "max", "mean", "lse")
_IDENTITY = {"add": 0.0, "max": float("-inf")}


class _WorkgroupReducer:
    """Reduce one value per invocation (f32, or i32 for an integer sum) to one value visible
    to every invocation of the group."""

    def __init__(self, kb: KernelBuilder, local: int, caps: object, acc_dt: str = "f32"):
        self.kb, self.acc_dt = kb, acc_dt
        min_sg = max(1, int(cap(caps, "min_subgroup_size", 1)))  # type: ignore[call-overload]
        self.slots: SharedArray = kb.shared(acc_dt, max(1, local // min_sg))
        # the fold's trips: at most ceil(local / min_sg) slots, min_sg or more lanes apiece
        self.fold_trips = math.ceil(math.ceil(local / min_sg) / min_sg)
        self.lane = kb.cast(kb.subgroup_invocation_id(), "i32")
        self.sg_id = kb.cast(kb.subgroup_id(), "i32")
        self.n_sg = kb.cast(kb.num_subgroups(), "i32")
        self.sg_size = kb.cast(kb.subgroup_size(), "i32")

    def combine(self, op: str, a: Value, b: Value) -> Value:
        return a + b if op == "add" else nan_minmax(self.kb, "max", a, b)

    def subgroup(self, op: str, x: Value) -> Value:
        return subgroup_max(self.kb, x) if op == "max" else self.kb.subgroup_reduce(op, x)

    def __call__(self, op: str, x: Value) -> Value:
        kb = self.kb
        partial = self.subgroup(op, x)
        kb.barrier()  # earlier readers of the slots (previous reduction) are done
        with kb.if_(self.lane == 0):
            self.slots.store(self.sg_id, partial)
        kb.barrier()
        # Every subgroup folds all slots itself: no third barrier, and NumSubgroups may exceed
        # SubgroupSize (256 threads / 8 lanes = 32 slots), hence the strided loop.
        acc = kb.var(self.acc_dt, _identity(op, self.acc_dt))
        with kb.loop(self.lane, self.n_sg, self.sg_size, max_trips=self.fold_trips) as j:
            acc.set(self.combine(op, acc.get(), self.slots.load(j)))
        return self.subgroup(op, acc.get())


def _identity(op: str, acc_dt: str) -> float | int:
    return 0 if acc_dt == "i32" else _IDENTITY[op]


def generate_reduction(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """SPIR-V for one row reduction (see the module docstring for the spec)."""
    p = dict(spec.params)
    if p["mode"] not in MODES:
        raise ValueError(f"{spec.name}: reduction mode {p['mode']!r} not in {MODES}")
    red_len = int(p["red_len"])
    if red_len < 1:
        raise ValueError(f"{spec.name}: cannot reduce an empty axis")
    if "strips" in p:
        return _build_strips(spec, caps)
    serial = _thread_per_row(red_len, int(p["red_stride"]), tuple(p["outer_strides"]),
                             math.prod(p["outer_shape"]), local_size_for(caps), caps)
    found = _build(spec, caps, serial)
    if "problem" in found.notes:
        # over llvmpipe's loop limit (a CPU device): the other layout where its bound fits,
        # else the plan refuses the kernel (StepPlan.problems, before anything runs)
        other = _build(spec, caps, not serial)
        return found if "problem" in other.notes else other
    return found


def _build(spec: KernelSpec, caps: object, serial: bool) -> KernelBinary:
    """The kernel with a thread per row (`serial`) or a workgroup per row."""
    p = dict(spec.params)
    mode, outer_shape = p["mode"], tuple(p["outer_shape"])
    outer_strides = tuple(p["outer_strides"])
    offset, red_len, red_stride = int(p["offset"]), int(p["red_len"]), int(p["red_stride"])
    in_dt, out_dt = p["in_dtype"], p["out_dtype"]
    rows = math.prod(outer_shape)
    local = local_size_for(caps)
    if serial:
        local = min(local, 64)  # small groups: short tails, and rows spread over more groups
    kb = KernelBuilder(spec.name, local, caps)
    kb.loop_workaround = (f"reduce in two steps (reshape to [..., n, {red_len} // n], sum "
                          "twice)")
    x_buf = kb.buffer("x", storage_dtype(in_dt), writable=False)
    out_buf = kb.buffer("out", storage_dtype(out_dt), writable=True)
    out_ct = compute_dtype(storage_dtype(out_dt))
    # an integer sum accumulates in i32 (exact, wrapping like PyTorch's); all else in f32
    acc_dt = "i32" if mode == "sum" and in_dt == "i32" else "f32"

    def load(base: Value, r: Value | int) -> Value:
        if isinstance(r, int):
            idx = base + r * red_stride if r else base
        else:
            idx = base + r * red_stride if red_stride != 1 else base + r
        return kb.cast(x_buf.load(idx), acc_dt)

    def combine(op: str, a: Value, b: Value) -> Value:
        return a + b if op == "add" else nan_minmax(kb, "max", a, b)  # NaN rows stay NaN

    def finish(row_reduce: Callable[..., Value]) -> Value:
        if mode == "max":
            return row_reduce("max")
        if mode == "lse":
            m = row_reduce("max")
            m = kb.select(kb.isinf(m), kb.f32(0.0), m)  # all -inf (or +inf) rows stay finite
            return kb.log(row_reduce("add", lambda v: kb.exp(v - m))) + m
        total = row_reduce("add")
        return total / float(red_len) if mode == "mean" else total

    if serial:
        # One thread owns one row: neighbouring threads read neighbouring rows (coalesced when
        # the rows are the contiguous axis), no shared memory, no barriers.
        gid = kb.cast(kb.global_id(0), "i32")
        stride = kb.cast(kb.num_workgroups(0), "i32") * local
        groups = max(1, min(math.ceil(rows / local), max_groups_x(caps)))
        with kb.loop(gid, rows, stride, max_trips=math.ceil(rows / (groups * local))) as row:
            base = _row_base(kb, row, outer_shape, outer_strides, offset)

            def serial_reduce(op: str, f: Callable[[Value], Value] = lambda v: v) -> Value:
                if red_len <= _UNROLL:  # straight-line code for short rows
                    acc = f(load(base, 0))
                    for r in range(1, red_len):
                        acc = combine(op, acc, f(load(base, r)))
                    return acc
                var = kb.var(acc_dt, _identity(op, acc_dt))
                with kb.loop(0, red_len) as r:
                    var.set(combine(op, var.get(), f(load(base, r))))
                return var.get()

            out_buf.store(row, kb.cast(finish(serial_reduce), out_ct))
        return kb.binary(spec, [Dispatch((groups, 1, 1))],
                         notes={"rows": rows, "red_len": red_len,
                                "thread_per_row": True,
                                "variant": f"thread per row x{local}"})

    reduce_group = _WorkgroupReducer(kb, local, caps, acc_dt)
    lid = kb.cast(kb.local_id(0), "i32")
    groups = max(1, min(rows, max_groups_x(caps)))
    with kb.loop(kb.cast(kb.workgroup_id(0), "i32"), rows,
                 kb.cast(kb.num_workgroups(0), "i32"), max_trips=math.ceil(rows / groups)) as row:
        base = _row_base(kb, row, outer_shape, outer_strides, offset)

        def group_reduce(op: str, f: Callable[[Value], Value] = lambda v: v) -> Value:
            acc = kb.var(acc_dt, _identity(op, acc_dt))
            with kb.loop(lid, red_len, local) as r:
                acc.set(combine(op, acc.get(), f(load(base, r))))
            return reduce_group(op, acc.get())

        total = finish(group_reduce)
        with kb.if_(lid == 0):
            out_buf.store(row, kb.cast(total, out_ct))

    return kb.binary(spec, [Dispatch((groups, 1, 1))],
                     notes={"rows": rows, "red_len": red_len,
                            "variant": f"workgroup per row x{local} (subgroup ops)"})


def strip_chunks(params: tuple, caps: object) -> int | None:
    """Row chunks of the column-strip layout for a reduction spec's params, or None where
    that layout does not apply: on a GPU, a float sum/mean/max over a longer strided axis
    whose outputs are side by side in memory (the innermost output axis has stride 1)."""
    p = dict(params)
    if cap(caps, "device_type", None) == "cpu" or p["mode"] == "lse" or p["in_dtype"] == "i32":
        return None
    inner = next((st for sh, st in zip(reversed(p["outer_shape"]), reversed(p["outer_strides"]),
                                       strict=True) if sh != 1), None)
    if inner != 1 or int(p["red_stride"]) <= 1 or int(p["red_len"]) <= _UNROLL:
        return None
    cols = math.prod(p["outer_shape"])
    lay = strip_layout(int(p["red_len"]), cols, caps)
    if math.ceil(cols / lay.lx) > max_groups_x(caps):
        return None  # more strips than workgroups along x: the grid-striding layouts
    return lay.chunks


def _build_strips(spec: KernelSpec, caps: object) -> KernelBinary:
    """The column-strip layout: output columns across lanes, the reduced axis down the rows."""
    p = dict(spec.params)
    mode, outer_shape = p["mode"], tuple(p["outer_shape"])
    red_len, red_stride = int(p["red_len"]), int(p["red_stride"])
    cols = math.prod(outer_shape)
    if mode not in ("sum", "mean", "max") or p["in_dtype"] == "i32":
        raise ValueError(f"{spec.name}: column strips reduce floats by sum, mean or max, "
                         f"not {mode} of {p['in_dtype']}")
    lay = strip_layout(red_len, cols, caps, chunks=int(p["strips"]), unroll=p.get("unroll"))
    kb = KernelBuilder(spec.name, (lay.lx, lay.ly, 1), caps)
    x_buf = kb.buffer("x", storage_dtype(p["in_dtype"]), writable=False)
    out_buf = kb.buffer("out", storage_dtype(p["out_dtype"]), writable=True)
    ws = kb.buffer("chunk_sums", "f32", writable=True) if lay.chunks > 1 else None
    out_ct = compute_dtype(storage_dtype(p["out_dtype"]))
    def column_base(col: Value) -> Value:  # the column's first element
        return _row_base(kb, col, outer_shape, tuple(p["outer_strides"]), int(p["offset"]))

    def load(r: Value, base: Value) -> list[Value]:
        return [kb.cast(x_buf.load(base + r * red_stride), "f32")]

    def store(_k: int, col: Value, total: Value) -> None:
        out_buf.store(col, kb.cast(total / float(red_len) if mode == "mean" else total, out_ct))

    op = "max" if mode == "max" else "add"
    dispatches = emit_column_sums(kb, lay, red_len, cols, [op], load, store, ws, column_base)
    return kb.binary(spec, dispatches, notes={"rows": cols, "red_len": red_len,
                                              "variant": lay.variant()})


_CPU_MIN_ROWS = 64  # CPU: a thread per row once there are enough rows for the cores
_UNROLL = 16  # rows up to this long are reduced by one thread in straight-line code


def _thread_per_row(red_len: int, red_stride: int, outer_strides: tuple, rows: int,
                    local: int, caps: object) -> bool:
    """Reduce each row in one thread rather than one workgroup?

    Short rows always (a workgroup per 4-element row is 256 threads summing nothing). Longer
    rows on CPU devices when the reduced axis is strided and rows are the contiguous axis
    (a sum over axis 0): the per-row workgroup would step through memory at the row stride,
    while a thread per row reads rows side by side; on GPUs only with rows enough to fill
    the device, since each thread then walks the whole row alone."""
    if red_len <= _UNROLL:
        return True
    if cap(caps, "device_type", None) == "cpu" and rows >= _CPU_MIN_ROWS:
        return True
    inner = next((s for s in reversed(outer_strides) if s != 0), None)
    strided = red_stride != 1 and inner is not None and abs(inner) < abs(red_stride)
    if not strided:
        return False
    if cap(caps, "device_type", None) == "cpu":
        return True
    return rows >= 64 * local and red_len <= 4096


def _row_base(kb: KernelBuilder, row: Value, shape: tuple, strides: tuple, offset: int) -> Value:
    """offset + sum(o_idx[d] * strides[d]) for the row-major index of `row` in `shape`."""
    total: Value | None = None
    inner = 1
    for d in reversed(range(len(shape))):
        if shape[d] != 1 and strides[d] != 0:
            idx = row / inner if inner != 1 else row
            if d > 0:
                idx = idx % shape[d]
            term = idx * strides[d] if strides[d] != 1 else idx
            total = term if total is None else total + term
        inner *= shape[d]
    if total is None:
        return kb.i32(offset)
    return total + offset if offset else total


def reference_reduction(spec: KernelSpec, x: np.ndarray) -> np.ndarray:
    """float64 numpy evaluation of the spec on the flat input buffer `x`."""
    p = dict(spec.params)
    flat = np.ascontiguousarray(x).reshape(-1)
    if p["in_dtype"] == "bf16":
        flat = (flat.astype(np.uint32) << 16).view(np.float32)
    flat = flat.astype(np.float64)
    shape = (*p["outer_shape"], p["red_len"])
    strides = (*p["outer_strides"], p["red_stride"])
    v = np.lib.stride_tricks.as_strided(flat[p["offset"]:], shape,
                                        tuple(s * 8 for s in strides))
    mode = p["mode"]
    if mode == "sum":
        return v.sum(-1)
    if mode == "mean":
        return v.mean(-1)
    if mode == "max":
        return v.max(-1)
    m = v.max(-1, keepdims=True)
    return (np.log(np.exp(v - m).sum(-1, keepdims=True)) + m)[..., 0]
