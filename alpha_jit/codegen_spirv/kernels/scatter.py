"""The scatter-add kernel family: `zeros(V, D).index_add(ids, src)`, the embedding gradient.

Why: every output row must come out the same bits on every run, so it is summed in one fixed
order, the order of the positions i, in f32, with no float atomics. Two variants keep that
order, so they give the same bits; the spec's ("variant", ...) says which (`choose`, called by
lowering, so the kernel caches key on it):
- walk (one dispatch): each output row is owned by one workgroup row, which walks all N ids in
  order (staged through shared memory in chunks) and sums the matching source rows. O(V*N) id
  reads, and a row's hits are added one dependent load at a time (a frequent id's row is a
  long chain): 1.2 ms of the H200 `small` step (V=256, D=384, N=16384), 22 GB/s. Kept where
  N is tiny: one dispatch and a few staging rounds beat two dispatches.
- segment (two dispatches of one module, a push constant picks the pass):
  pass 0: workgroup k sorts the chunk of C positions [k*C, k*C + C) by (id, position) in shared
    memory (a bitonic network; the pairs are distinct, so the order is total: stable and
    deterministic by construction) and writes the sorted ids and positions to a workspace;
  pass 1: a workgroup owns a block of output rows: its threads binary-search every chunk for
    the block's row bounds (a shared table), then each row adds its run in chunk 0, chunk 1,
    ... - positions ascending, the walk's order, hence the walk's bits - loading `unroll`
    source rows before adding them in order (memory-level parallelism, same order).
  O(N log^2 C) sorting, O(V/rows * K log C) searching, N*D loads and V*D stores.
On a CPU device llvmpipe ends every loop of an invocation after 65535 passes in all
(`loop_budget.py`): the loop bound assumes one id at every position (about N/4 passes for the
segment variant, a row per thread there; N for the walk), `choose` takes the variant whose
bound fits, and a step no variant fits is refused by the plan, never summed short.
Out-of-range ids (outside [0, V)) add to no row in either: the walk never matches them, the
sort puts them before row 0 or after row V-1, outside every row's bounds (the host also
rejects them in inputs).

Spec (params as (key, value) pairs):
    ("rows", V), ("dim", D), ("n", N), ("dtype", dt), ("src_offset", s), ("ids_offset", i),
    then ("variant", "walk") or ("variant", "segment"), ("chunk", C) (none: walk)
    bindings: src (element (i, d) at s + i*D + d), ids i32 (N from i), out (V, D); segment adds
    work i32 [2*K*C], K = ceil(N / C): the sorted ids of every chunk, then their positions.
Push constants: base_x, base_y, base_z (split grids), segment adds the pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..dsl import Buffer, KernelBuilder, Value, cap
from ..kernel import KernelBinary, KernelSpec
from .gather import DEFAULT_LOCAL_SIZE, budget, dispatches, finish, local_shape, setup

_INT_MAX = (1 << 31) - 1
# The walk while N is this small (at most 4 staging rounds per workgroup) and its id reads
# (V*N, from cache) are few; past either, the segment variant's fixed cost (two dispatches, a
# 55-step sort) is the smaller one.
WALK_MAX_N = 1024
WALK_MAX_WORK = 1 << 20
_CHUNK = 1024  # positions per sorted chunk: 55 sort steps; fewer, shorter runs for pass 1
_TABLE = 4096  # pass 1's row-bounds table, at most (16 KiB of shared memory)
_FILL = 1024  # workgroups that fill a big GPU; past that a thread takes several rows
_MAX_ROWS = 16  # rows per thread, at most
_MIN_LX = 32  # a row's threads fill a 32-wide subgroup: rows (whose runs differ) never share one
# Source rows loaded ahead of their in-order adds: a frequent id's run (about 1 byte in 6 of
# English text is a space) is latency-bound, one round trip per `unroll` rows. On a CPU there
# is no latency to hide, and llvmpipe's time grew with the unrolled body (x6 at 32).
_UNROLL = 32
_UNROLL_CPU = 4
# over llvmpipe's loop limit: fewer positions per scatter (the bound assumes one id at all)
_WORKAROUND = ("scatter fewer positions per step (a smaller batch x sequence), or run the step "
               "on a GPU device")


@dataclass(frozen=True)
class SegmentLayout:
    """Pass 1's shape (and pass 0's chunking) for one spec on one device."""

    lx: int  # threads along D, one column each
    ly: int  # rows of threads
    rows: int  # rows per thread, at strides of ly
    chunk: int  # C: positions per sorted chunk, a power of two
    chunks: int  # K = ceil(N / C)
    unroll: int  # positions of a run loaded ahead of their in-order adds

    @property
    def block(self) -> int:
        """Output rows per workgroup."""
        return self.ly * self.rows

    @property
    def steps(self) -> int:
        """Binary-search steps that settle any count in [0, C]."""
        return self.chunk.bit_length()


def _lx(dim: int, caps: object) -> int:
    """Threads along D: the power of two (>= _MIN_LX) idling the fewest of them over D
    columns, the widest on ties (D=384 gets 128 x 3 workgroups, D=768 256 x 3)."""
    total = budget(caps)
    widths = [1 << e for e in range(total.bit_length()) if 1 << e >= min(_MIN_LX, total)]
    return min(widths, key=lambda lx: (lx * math.ceil(dim / lx) - dim, -lx))


def default_chunk(n: int, caps: object) -> int:
    """C: _CHUNK (a quarter of the device's shared memory at most: pass 0 keeps ids and
    positions), less for a short N."""
    shared = int(cap(caps, "max_shared_memory", 16384))  # type: ignore[call-overload]
    room = 1 << ((shared // 32).bit_length() - 1)
    return max(2, min(_CHUNK, room, 1 << max(0, n - 1).bit_length()))


def segment_layout(rows: int, dim: int, n: int, chunk: int, caps: object
                   ) -> SegmentLayout | None:
    """The layout, or None where there is nothing to sort or sum (no row, no position) or
    the bounds table cannot hold one row of threads' bounds for every chunk within the
    device's shared memory (N beyond about C * _TABLE / 9)."""
    if rows < 1 or dim < 1 or n < 1 or chunk < 1 or chunk & (chunk - 1):
        return None
    lx = _lx(dim, caps)
    ly = budget(caps) // lx
    chunks = math.ceil(n / chunk)
    shared = int(cap(caps, "max_shared_memory", 16384))  # type: ignore[call-overload]
    table = min(_TABLE, (shared - 8 * chunk) // 4)  # beside pass 0's two chunk arrays
    fit = (table // chunks - 1) // ly  # rows per thread whose bounds fit the table
    want = min(_MAX_ROWS, math.ceil(rows * math.ceil(dim / lx) / (ly * _FILL)))
    if fit < 1:
        return None
    if cap(caps, "device_type", None) == "cpu":
        # a row per thread: no GPU to fill, and llvmpipe's loop bound counts each of a
        # thread's rows as if it held all N positions (one row's worst case is the real one)
        return SegmentLayout(lx, ly, 1, chunk, chunks, _UNROLL_CPU)
    return SegmentLayout(lx, ly, min(want, fit), chunk, chunks, _UNROLL)


def choose(rows: int, dim: int, n: int, caps: object) -> tuple:
    """The variant params lowering appends to a scatter spec: the walk where N (and V*N) is
    tiny or the segment variant does not fit the device, else the segment variant. On a CPU
    device also the walk where only the walk's loop bound (the worst case: one row holding all
    N positions) fits llvmpipe's loop limit; where neither fits, the segment variant, whose
    problem note makes the plan refuse the step."""
    chunk = default_chunk(n, caps)
    tiny = n <= WALK_MAX_N and rows * n <= WALK_MAX_WORK
    walk, segment = (("variant", "walk"),), (("variant", "segment"), ("chunk", chunk))
    if tiny or segment_layout(rows, dim, n, chunk, caps) is None:
        return walk
    if cap(caps, "device_type", None) == "cpu" and not _fits_loop_limit(
            rows, dim, n, segment, caps) and _fits_loop_limit(rows, dim, n, walk, caps):
        return walk
    return segment


def _fits_loop_limit(rows: int, dim: int, n: int, variant: tuple, caps: object) -> bool:
    """Whether the variant's kernel has no problem note on the device (its loop bound, from
    the generator itself, does not depend on the dtype or offsets)."""
    spec = KernelSpec("scatter", "scatter_choice", (
        ("rows", rows), ("dim", dim), ("n", n), ("dtype", "f32"), ("src_offset", 0),
        ("ids_offset", 0), *variant))
    return "problem" not in generate(spec, caps).notes


def workspace_words(params: tuple) -> int:
    """i32 words of the spec's workspace binding (0: none, the walk)."""
    p = dict(params)
    if p.get("variant", "walk") == "walk":
        return 0
    return 2 * math.ceil(p["n"] / p["chunk"]) * p["chunk"]


def generate(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """out = zeros(V, D); out[ids[i]] += src[i] for i in order (deterministic, f32 sums)."""
    variant = dict(spec.params).get("variant", "walk")
    if variant == "walk":
        return _generate_walk(spec, caps)
    if variant == "segment":
        return _generate_segment(spec, caps)
    raise ValueError(f"{spec.name}: unknown scatter variant {variant!r}")


def _generate_walk(spec: KernelSpec, caps: object) -> KernelBinary:
    """Every workgroup walks all N ids; a row's hits are added in order."""
    V, D, N = (dict(spec.params)[k] for k in ("rows", "dim", "n"))
    # Up to 4 columns per invocation: fewer workgroups, so the ids are scanned fewer times.
    cols = max(1, min(4, D // DEFAULT_LOCAL_SIZE))
    shape = local_shape(math.ceil(D / cols), caps)
    kb, p, (src, ids, out), _, r, d = setup(spec, caps, "src", V, shape, cols)
    kb.loop_workaround = _WORKAROUND
    lx, ly = shape
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
                with kb.loop(kb.u32(0), kb.op("OpBitCount", "u32", bits.get()), 1,
                             max_trips=32):  # the set bits of one word
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
    return finish(kb, spec, p, caps, variant="walk")


def _generate_segment(spec: KernelSpec, caps: object) -> KernelBinary:
    """Pass 0 sorts the chunks, pass 1 sums each row's runs (module docstring)."""
    prm = dict(spec.params)
    V, D, N, C = prm["rows"], prm["dim"], prm["n"], prm["chunk"]
    lay = segment_layout(V, D, N, C, caps)
    if lay is None:
        raise ValueError(f"{spec.name}: the segment scatter does not fit N={N} in chunks of "
                         f"{C} on this device; lowering picks the walk there")
    kb, p, (src, ids, out), pc, row, d = setup(spec, caps, "src", V, (lay.lx, lay.ly),
                                                rows=lay.rows, fields=[("pass", "u32")])
    kb.loop_workaround = _WORKAROUND
    work = kb.buffer("work", "i32", writable=True)
    tid = kb.cast(kb.local_index(), "i32")
    with kb.if_else(pc["pass"] == 0) as (sort, sums):
        with sort:
            chunk = kb.cast(kb.workgroup_id(0) + pc["base_x"], "i32")
            _sort_chunk(kb, lay, N, ids, p["ids_offset"], work, chunk, tid)
        with sums:
            _segment_sums(kb, lay, p, src, out, work, row, d, tid)
    plan = [*dispatches((lay.chunks, 1, 1), caps, 0), *dispatches(p["_groups"], caps, 1)]
    return finish(kb, spec, p, caps, plan, f"segment: sort {lay.chunks}x{C}, sum {lay.lx}x"
                  f"{lay.ly}x{lay.rows} rows, unroll {lay.unroll}")


def _sort_chunk(kb: KernelBuilder, lay: SegmentLayout, n: int, ids: Buffer, i_off: int,
                work: Buffer, chunk: Value, tid: Value) -> None:
    """Sort chunk `chunk` by (id, position) and write its ids to work[k*C + e], its positions
    to work[K*C + k*C + e]. Positions past N get id INT_MAX: they sort after every real one."""
    C, T = lay.chunk, budget(kb.caps)
    keys, where = kb.shared("i32", C), kb.shared("i32", C)
    first = chunk * C
    with kb.loop(tid, C, T) as e:
        pos = first + e
        key = kb.var("i32", _INT_MAX)
        with kb.if_(pos < n):
            key.set(ids.load(pos + i_off))
        keys.store(e, key.get())
        where.store(e, pos)
    one = kb.i32(1)
    # Bitonic: sequences of 2^s sorted up or down by (i & 2^s), merged at distances 2^(s-1-t).
    with kb.loop(1, C.bit_length()) as s, kb.loop(0, s, max_trips=C.bit_length() - 1) as t:
        kb.barrier()  # the previous step's exchanges are visible
        shift = s - 1 - t
        with kb.loop(tid, C // 2, T) as q:
            i = ((q >> shift) << (shift + 1)) | (q & ((one << shift) - 1))
            j = i + (one << shift)
            ki, kj, pi, pj = keys.load(i), keys.load(j), where.load(i), where.load(j)
            after = (ki > kj) | ((ki == kj) & (pi > pj))
            with kb.if_(after == ((i & (one << s)) == 0)):  # out of this sequence's order
                keys.store(i, kj)
                keys.store(j, ki)
                where.store(i, pj)
                where.store(j, pi)
    kb.barrier()
    with kb.loop(tid, C, T) as e:
        work.store(first + e, keys.load(e))
        work.store(first + e + lay.chunks * C, where.load(e))


def _lower_bound(kb: KernelBuilder, lay: SegmentLayout, work: Buffer, base: Value,
                 count: Value, value: Value) -> Value:
    """The first index in [0, count) of the sorted ids at work[base:] that is >= value (count
    if none)."""
    lo, hi = kb.var("i32", 0), kb.var("i32", count)
    with kb.loop(0, lay.steps):
        a, b = lo.get(), hi.get()
        with kb.if_(a < b):
            mid = (a + b) >> 1
            less = work.load(base + mid) < value
            lo.set(kb.select(less, mid + 1, a))
            hi.set(kb.select(less, b, mid))
    return lo.get()


def _segment_sums(kb: KernelBuilder, lay: SegmentLayout, p: dict, src: Buffer, out: Buffer,
                  work: Buffer, row: Value, d: Value, tid: Value) -> None:
    """Each row of the workgroup's block: its run in every chunk, positions ascending."""
    V, D, N, C, K, U = p["rows"], p["dim"], p["n"], lay.chunk, lay.chunks, lay.unroll
    # table[rel * K + k]: where chunk k's run of row r0 + rel starts (rel = block: the end)
    table = kb.shared("i32", (lay.block + 1) * K)
    y = kb.cast(kb.local_id(1), "i32")
    r0 = kb.cast(row, "i32") - y
    with kb.loop(tid, (lay.block + 1) * K, budget(kb.caps)) as t:
        rel = t / K
        base = (t - rel * K) * C
        count = kb.fmin(N - base, C)
        table.store(t, base + _lower_bound(kb, lay, work, base, count, r0 + rel))
    kb.barrier()
    ragged = D % lay.lx != 0
    # an overhanging column loads the row's last element (in bounds) and is never stored
    at = (kb.fmin(d, D - 1) if ragged else d) + p["src_offset"]
    ahead = [kb.var("i32") for _ in range(U)]  # the next round's positions, loaded a round early

    def prefetch(j: Value, hi: Value) -> None:
        for u in range(U):  # past the run: its last position again (in bounds, never added)
            ahead[u].set(work.load(K * C + kb.fmin(j + u, hi - 1)))

    with kb.loop(0, lay.rows) as i:
        rel = y + i * lay.ly
        with kb.if_(r0 + rel < V):
            acc = kb.var("f32", 0.0)
            with kb.loop(0, K) as k:
                lo, hi = table.load(rel * K + k), table.load((rel + 1) * K + k)
                with kb.if_(lo < hi):
                    prefetch(lo, hi)
                    # a run lies in one chunk: at most min(C, N) positions
                    with kb.loop(lo, hi, U, max_trips=math.ceil(min(C, N) / U)) as j:
                        xs = [src.load(kb.cast(a.get(), "u32") * D + at) for a in ahead]
                        prefetch(j + U, hi)
                        for u, x in enumerate(xs):  # in order: the walk's sum, bit for bit
                            a = acc.get()
                            acc.set(a + x if u == 0 else kb.select(j + u < hi, a + x, a))
            with kb.when(d < D if ragged else None):
                out.store(kb.cast(r0 + rel, "u32") * D + d, acc.get())
