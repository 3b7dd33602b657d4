"""The gather / scatter-add kernel families: embedding lookups and their gradients.

Why: `table[ids]` (embeddings, label picks) and its VJP, `zeros(V, D).index_add(ids, src)`, are
the only data-dependent addressing in a training step. Both are written for safety and
reproducibility first:
- gather never reads outside the table: an id outside [0, V) writes NaN (INT_MIN for integer
  tables) instead of a clamped row, so a bad id is loud, never a silently wrong value (ids are
  also range-checked on the host before any GPU work);
- scatter is deterministic without float atomics: each output row is owned by one workgroup row,
  which walks all N ids in order (staged through shared memory in chunks) and sums the matching
  source rows in f32, so every run gives the same bits.

A workgroup is (lx, ly): lx threads along the embedding dimension d, ly rows; small D packs
several rows per workgroup instead of idling threads.

Specs (params as (key, value) pairs):
    gather:  ("rows", V), ("dim", D), ("n", N), ("dtype", dt), ("table_offset", t),
             ("ids_offset", i)
             bindings: table (element (r, d) at t + r*D + d), ids i32 (N from i), out (N, D)
    scatter: ("rows", V), ("dim", D), ("n", N), ("dtype", dt), ("src_offset", s),
             ("ids_offset", i)
             bindings: src (element (i, d) at s + i*D + d), ids i32 (N from i), out (V, D)
Push constants (base_x, base_y, base_z) offset the workgroup ids of split grids.
"""

from __future__ import annotations

import math

from ..dsl import KernelBuilder, Value, cap, pack_push_constants
from ..kernel import Dispatch, KernelBinary, KernelSpec
from .elementwise import storage_dtype
from .matmul import grid_plan

DEFAULT_LOCAL_SIZE = 256
_INT_MIN = -(1 << 31)


def _local_shape(dim: int, caps: object) -> tuple[int, int]:
    """(lx, ly): lx a power of two covering D up to the budget, ly rows filling the rest."""
    budget = int(min(DEFAULT_LOCAL_SIZE, cap(caps, "max_workgroup_invocations",  # type: ignore
                                               DEFAULT_LOCAL_SIZE)))
    budget = 1 << (budget.bit_length() - 1)
    lx = min(budget, 1 << max(0, dim - 1).bit_length())
    return lx, budget // lx


def _setup(spec: KernelSpec, caps: object, first: str, out_rows: int, cols: int = 1
           ) -> tuple[KernelBuilder, dict, tuple, tuple[int, int], Value, Value]:
    """Builder, bindings, push constants, this invocation's row and first column (its others
    follow at strides of lx: `cols` columns per invocation)."""
    p = dict(spec.params)
    lx, ly = _local_shape(math.ceil(p["dim"] / cols), caps)
    kb = KernelBuilder(spec.name, (lx, ly, 1), caps)
    dt = storage_dtype(p["dtype"])
    bufs = (kb.buffer(first, dt, writable=False), kb.buffer("ids", "i32", writable=False),
            kb.buffer("out", dt, writable=True))
    pc = kb.push_constants([("base_x", "u32"), ("base_y", "u32"), ("base_z", "u32")])
    d = (kb.workgroup_id(0) + pc["base_x"]) * (lx * cols) + kb.local_id(0)
    row = (kb.workgroup_id(1) + pc["base_y"]) * ly + kb.local_id(1)
    p["_groups"] = (math.ceil(p["dim"] / (lx * cols)), math.ceil(out_rows / ly), 1)
    return kb, p, bufs, (lx, ly), row, d


def _finish(kb: KernelBuilder, spec: KernelSpec, p: dict, caps: object) -> KernelBinary:
    dispatches = [Dispatch(cnt, pack_push_constants([("u32", b) for b in base]))
                  for cnt, base in grid_plan(p["_groups"], caps)]
    return kb.binary(spec, dispatches, notes={"rows": p["rows"], "dim": p["dim"], "n": p["n"]})


def generate_gather(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """out[i, d] = table[ids[i], d]; NaN (INT_MIN for i32) where ids[i] is outside [0, V)."""
    V, D, N = (dict(spec.params)[k] for k in ("rows", "dim", "n"))
    kb, p, (table, ids, out), _, i, d = _setup(spec, caps, "table", N)
    t_off, i_off = p["table_offset"], p["ids_offset"]
    bad = kb.f32(float("nan")) if table.compute == "f32" else kb.const(_INT_MIN, table.compute)
    with kb.if_((i < N) & (d < D)):
        r = ids.load(i + i_off)  # one id per row of threads: a broadcast load
        dst = i * D + d
        with kb.if_else((r >= 0) & (r < V)) as (ok, oob):
            with ok:
                out.store(dst, table.load(kb.cast(r, "u32") * D + (d + t_off)))
            with oob:
                out.store(dst, bad)
    return _finish(kb, spec, p, caps)


def generate_scatter(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """out = zeros(V, D); out[ids[i]] += src[i] for i in order (deterministic, f32 sums)."""
    V, D, N = (dict(spec.params)[k] for k in ("rows", "dim", "n"))
    # Up to 4 columns per invocation: fewer workgroups, so the ids are scanned fewer times.
    cols = max(1, min(4, D // DEFAULT_LOCAL_SIZE))
    kb, p, (src, ids, out), (lx, ly), r, d = _setup(spec, caps, "src", V, cols)
    s_off, i_off = p["src_offset"], p["ids_offset"]
    chunk = lx * ly  # one id per invocation per refill of the shared staging array
    words = math.ceil(chunk / 32)
    staged = kb.shared("i32", chunk)
    hits = kb.shared("u32", words)  # bit t: staged[t] names one of this workgroup's rows
    tid = kb.local_index()
    row0 = kb.cast(r - kb.local_id(1), "i32")
    want = kb.cast(r, "i32")
    live_row = r < V
    col = [d + c * lx for c in range(cols)]
    live = [live_row & (x < D) for x in col]
    acc = [kb.var("f32", 0.0) for _ in range(cols)]
    u32 = kb.type("u32")
    with kb.loop(kb.u32(0), N, chunk) as c0:
        kb.barrier()  # everyone has finished reading the previous chunk
        with kb.if_(tid < words):
            hits.store(tid, kb.u32(0))
        j = c0 + tid
        id_or_pad = kb.var("i32", -1)  # past N: -1, which names no row
        with kb.if_(j < N):
            id_or_pad.set(ids.load(j + i_off))
        staged.store(tid, id_or_pad.get())
        kb.barrier()
        # Atomic OR is order-independent, so the bit mask (and everything after) is deterministic.
        with kb.if_(kb.cast(id_or_pad.get() - row0, "u32") < ly):
            # No shared atomics in the DSL yet: emit OpAtomicOr on the shared word directly.
            kb.m.emit("OpAtomicOr", u32, hits._ptr(tid >> 5), "Workgroup", "Relaxed",
                      kb.u32(1) << (tid & 31))
        kb.barrier()
        # Visit only the hits, in increasing position: sums run in the order of i, every run.
        with kb.if_(live_row):
            for w in range(words):
                bits = kb.var("u32", hits.load(w))
                with kb.loop(kb.u32(0), kb.op("OpBitCount", "u32", bits.get()), 1):
                    b = bits.get()
                    bits.set(b & (b - 1))
                    t = kb.glsl("FindILsb", "u32", b) + 32 * w
                    with kb.if_(staged.load(t) == want):
                        row = (c0 + t) * D + s_off
                        for c in range(cols):
                            if D % (lx * cols) == 0:  # every column exists: no check
                                acc[c].set(acc[c].get() + src.load(row + col[c]))
                                continue
                            with kb.if_(live[c]):
                                acc[c].set(acc[c].get() + src.load(row + col[c]))
    for c in range(cols):
        with kb.if_(live[c]):
            out.store(r * D + col[c], acc[c].get())
    return _finish(kb, spec, p, caps)
