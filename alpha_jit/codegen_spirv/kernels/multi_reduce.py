"""Multi-tensor reduction kernels: the sum of squares of many tensors in two dispatches.

Stage 1 (`sumsq_partial`): every tensor gets workgroups in proportion to its size; a workgroup
finds its tensor once (an unrolled comparison of its id against each tensor's first group),
walks its slice of that tensor with a stride, and writes one partial sum. Stage 2
(`sumsq_final`): one workgroup adds the partials of every stage-1 kernel. Tensors beyond the
device's bindings per stage go to further stage-1 kernels. All sums in f32; a NaN or inf in any
tensor reaches the result as numpy's sum would carry it.

Spec "sumsq_partial": ("segments", ((binding, dtype, offset, numel, groups), ...)),
("groups", total). Bindings: the distinct input buffers, then the partials (f32[groups]).
Spec "sumsq_final": ("parts", (n0, n1, ...)). Bindings: each partials buffer, then the f32
scalar output.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from alpha_jit import dtypes

from ..dsl import KernelBuilder, max_groups_x
from ..kernel import Dispatch, KernelBinary, KernelSpec
from ..lower import Buffer, register_kernel_lowering
from ..views import View
from .elementwise import local_size_for, storage_dtype
from .reduction import _WorkgroupReducer

FAMILIES = {"sumsq_partial": "generate_sumsq_partial", "sumsq_final": "generate_sumsq_final"}
_PER_THREAD = 16  # elements each thread adds before the workgroup reduction


def generate_sumsq_partial(spec: KernelSpec, caps: object = None) -> KernelBinary:
    p = dict(spec.params)
    segments, total = p["segments"], int(p["groups"])
    local = local_size_for(caps)
    kb = KernelBuilder(spec.name, local, caps)
    n_in = max(b for b, *_ in segments) + 1
    dts = {b: dt for b, dt, *_ in segments}
    bufs = [kb.buffer(f"x{i}", storage_dtype(dts[i]), writable=False) for i in range(n_in)]
    out = kb.buffer("partials", "f32", writable=True)
    reduce_group = _WorkgroupReducer(kb, local, caps)
    wg = kb.cast(kb.workgroup_id(0), "i32")
    lid = kb.cast(kb.local_id(0), "i32")
    acc = kb.var("f32", 0.0)
    first = 0
    for b, _dt, offset, numel, groups in segments:
        with kb.if_((wg >= first) & (wg < first + groups)):
            start = (wg - first) * local + lid if first else wg * local + lid
            with kb.loop(start, numel, groups * local) as i:
                x = kb.cast(bufs[b].load(i + offset if offset else i), "f32")
                acc.set(acc.get() + x * x)
        first += groups
    total_sum = reduce_group("add", acc.get())
    with kb.if_(lid == 0):
        out.store(wg, total_sum)
    return kb.binary(spec, [Dispatch((total, 1, 1))], notes={
        "variant": f"multi-tensor x{len(segments)} partials x{local}"})


def generate_sumsq_final(spec: KernelSpec, caps: object = None) -> KernelBinary:
    parts = dict(spec.params)["parts"]
    local = local_size_for(caps)
    kb = KernelBuilder(spec.name, local, caps)
    bufs = [kb.buffer(f"p{i}", "f32", writable=False) for i in range(len(parts))]
    out = kb.buffer("out", "f32", writable=True)
    reduce_group = _WorkgroupReducer(kb, local, caps)
    lid = kb.cast(kb.local_id(0), "i32")
    acc = kb.var("f32", 0.0)
    for buf, n in zip(bufs, parts, strict=True):
        with kb.loop(lid, n, local) as i:
            acc.set(acc.get() + buf.load(i))
    total = reduce_group("add", acc.get())
    with kb.if_(lid == 0):
        out.store(0, total)
    return kb.binary(spec, [Dispatch((1, 1, 1))], notes={"variant": f"final sum x{local}"})


def _group_counts(numels: list[int], local: int) -> list[int]:
    """Workgroups per tensor, in proportion to its size, in all within one dispatch."""
    per = max(_PER_THREAD, math.ceil(sum(numels) / (local * (max_groups_x(None) // 2))))
    return [max(1, math.ceil(k / (local * per))) for k in numels]


def _flat(lw: Any, v: View, n: int) -> View:
    """View v as one flat block: element order does not matter to a sum of squares, so a
    transposed gradient (a weight-gradient GEMM's result) is read where it is, uncopied."""
    if not (v.is_contiguous() or v.dense()):
        v = lw.materialize_view(v, lw.out.buffers[v.base].dtype, n)
    return View(v.base, v.offset, (v.numel,), (1,))


def _runs(v: View) -> tuple[np.ndarray, int]:
    """The view's elements as runs of consecutive addresses: (run starts, run length). The axes
    with the smallest strides that are contiguous in memory (in any axis order: a transposed
    slice too) form one run; the others enumerate starts."""
    dims = sorted(((s, st) for s, st in zip(v.shape, v.strides, strict=True) if s != 1),
                  key=lambda d: -d[1])
    length = 1
    while dims and dims[-1][1] == length:
        length *= dims.pop()[0]
    starts = np.full(1, v.offset, np.int64)
    for s, st in dims:
        starts = (starts[:, None] + np.arange(s, dtype=np.int64) * st).reshape(-1)
    return starts, length


def _partitions(items: list[tuple[str, View]], lw: Any) -> list[tuple[str, View]]:
    """Views that together cover one buffer exactly once (the q/k/v weight gradients, slices
    of one merged weight-gradient GEMM's result) become that whole buffer, read flat."""
    by_base: dict[int, list[int]] = {}
    for i, (_, v) in enumerate(items):
        if not (v.is_contiguous() or v.dense()):
            by_base.setdefault(v.base, []).append(i)
    whole: dict[int, int] = {}  # first item of a covered buffer -> the buffer
    drop: set[int] = set()
    for base, idx in by_base.items():
        size = math.prod(lw.out.buffers[base].shape)
        if len(idx) < 2 or sum(items[i][1].numel for i in idx) != size:
            continue
        # runs of consecutive addresses tile [0, size) exactly once iff, sorted by start, each
        # starts where the previous ended, the first at 0 and the last ending at size
        runs = [_runs(items[i][1]) for i in idx]
        starts = np.concatenate([s for s, _ in runs])
        lengths = np.concatenate([np.full(len(s), n, np.int64) for s, n in runs])
        order = np.argsort(starts, kind="stable")
        starts, lengths = starts[order], lengths[order]
        ends = starts + lengths
        if starts[0] == 0 and ends[-1] == size and (starts[1:] == ends[:-1]).all():
            whole[idx[0]] = base
            drop.update(idx[1:])
    out = []
    for i, (dt, v) in enumerate(items):
        if i in whole:
            shape = lw.out.buffers[whole[i]].shape
            out.append((dt, View(whole[i], 0, (math.prod(shape),), (1,))))
        elif i not in drop:
            out.append((dt, v))
    return out


@register_kernel_lowering("sum_squares")
def lower_sum_squares(lw: Any, n: int) -> None:
    """Stage-1 kernels over the tensors (as many as the bindings need), then the final sum."""
    g = lw.g
    items = _partitions([(g.dtype(a).name, lw.need_view(a, n)) for a in g.args(n)], lw)
    items = [(dt, _flat(lw, v, n)) for dt, v in items]
    local = local_size_for(None)  # the generators' default size: grids are planned here
    per_kernel = max(1, lw.max_bindings - 1)  # one binding is the partials
    chunks: list[list[tuple[str, Any]]] = [[]]
    for dt, v in items:
        if len({w.base for _, w in chunks[-1]} | {v.base}) > per_kernel:
            chunks.append([])
        chunks[-1].append((dt, v))
    parts: list[int] = []
    sizes: list[int] = []
    for chunk in chunks:
        bases = list(dict.fromkeys(v.base for _, v in chunk))
        counts = _group_counts([v.numel for _, v in chunk], local)
        segments = tuple((bases.index(v.base), dt, v.offset, v.numel, c)
                         for (dt, v), c in zip(chunk, counts, strict=True))
        buf = next(lw.copy_ids)
        lw.out.buffers[buf] = Buffer(buf, "temp", (sum(counts),), dtypes.float32)
        params = (("segments", segments), ("groups", sum(counts)))
        lw._emit("sumsq_partial", f"sumsq_partial_{len(chunk)}", params, bases, [buf], [], n)
        parts.append(buf)
        sizes.append(sum(counts))
    lw._emit("sumsq_final", f"sumsq_final_{len(parts)}", (("parts", tuple(sizes)),), parts,
             [n], [n], n)
