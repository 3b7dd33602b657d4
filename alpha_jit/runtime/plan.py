"""The plan: where every temporary lives (memory pools with reuse) and where barriers go.

Liveness is measured in kernel positions: a temporary is live from the kernel that writes it
to the last kernel that reads it (values leaving the step live to the end). Offsets are given
greedily, largest first, to the lowest address not overlapping a live-at-the-same-time value,
so the peak size is known at compile time. No Vulkan device grants one allocation of any size
(maxMemoryAllocationSize is about 4 GiB on an H200, 2 GiB on lavapipe), so the address space
is cut into pools of at most `pool_limit` bytes: a temporary goes to the first pool where it
fits below the limit, and each pool becomes one device allocation. A barrier goes before a
kernel only when it touches bytes that an earlier kernel since the last barrier wrote (or
writes bytes one read).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from alpha_jit.codegen_spirv.lower import Lowered


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass
class MemoryPlan:
    offsets: dict[int, int]  # temp buffer id -> byte offset in its pool
    pool_bytes: list[int]  # size of each pool (one device allocation each)
    intervals: dict[int, tuple[int, int]]  # temp buffer id -> (first, last) kernel position
    naive_bytes: int  # what the temporaries would take without reuse
    pool_of: dict[int, int] = field(default_factory=dict)  # temp buffer id -> pool index
    # temp buffer id -> the state buffer whose memory it is written into (an in-place update:
    # no arena memory, no copy back at the end of the step)
    state_alias: dict[int, int] = field(default_factory=dict)

    @property
    def arena_bytes(self) -> int:
        """All pools together: the temporaries' peak."""
        return sum(self.pool_bytes)

    def format(self) -> str:
        pools = f" in {len(self.pool_bytes)} pools" if len(self.pool_bytes) > 1 else ""
        return (f"arena: {self.arena_bytes / 2**20:.2f} MiB{pools} for {len(self.offsets)} "
                f"temporaries (without reuse {self.naive_bytes / 2**20:.2f} MiB)")


def plan_memory(lowered: Lowered, align: int = 256, pool_limit: int | None = None
                ) -> MemoryPlan:
    """Offsets for every temporary; pools of at most `pool_limit` bytes (None: one pool)."""
    temps = {b.id: b for b in lowered.buffers.values() if b.kind == "temp"}
    nbytes = {b: t.nbytes for b, t in temps.items()}  # a property computing a product
    end = len(lowered.kernels)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, k in enumerate(lowered.kernels):
        for b in k.writes:
            first.setdefault(b, i)
            last[b] = max(last.get(b, i), i)
        for b in k.reads:
            last[b] = max(last.get(b, i), i)
    for b in [*lowered.outputs, *lowered.state_writes.values()]:
        last[b] = end  # copied out after the last kernel
    aliases = _state_aliases(lowered, first, last)
    for w in aliases:
        del temps[w], nbytes[w]
    intervals = {b: (first.get(b, 0), last.get(b, end)) for b in temps}
    slots = _inplace_slots(lowered, nbytes, first, last)
    members: dict[int, list[int]] = {}
    for b in temps:
        members.setdefault(slots.get(b, b), []).append(b)
    # per pool: (offset, end offset, first kernel, last kernel), kept sorted by address
    placed: list[list[tuple[int, int, int, int]]] = []
    offsets: dict[int, int] = {}
    pool_of: dict[int, int] = {}
    naive = sum(_round_up(nbytes[b], align) for b in temps)
    for b in sorted(members, key=lambda b: (-nbytes[b], b)):
        size = _round_up(max(nbytes[m] for m in members[b]), align)
        s = min(intervals[m][0] for m in members[b])
        e = max(intervals[m][1] for m in members[b])
        pool, off = 0, 0
        while pool < len(placed):
            off = _lowest_fit(placed[pool], s, e, size, align)
            if pool_limit is None or off + size <= pool_limit:
                break
            pool += 1
        if pool == len(placed):  # a new pool (a value over the limit gets one; plans report it)
            placed.append([])
            off = 0
        for m in members[b]:
            offsets[m], pool_of[m] = off, pool
        bisect.insort(placed[pool], (off, off + size, s, e))
    pools = [max(hi for _, hi, _, _ in items) for items in placed]
    return MemoryPlan(offsets, pools, intervals, naive, pool_of, aliases)


def _state_aliases(lowered: Lowered, first: dict[int, int], last: dict[int, int]
                   ) -> dict[int, int]:
    """temp -> state buffer: a kernel's in-place pair (state, the value written back to that
    state) where the kernel is the state's last reader and the value's first writer. The
    optimizer then updates parameters and moments where they live: the end-of-step copies
    took 3 ms of a GPT-2 step on the H200 (1.5 GB of parameters and moments)."""
    writes: dict[int, set] = {}  # one value may be written back to several states
    for key, w in lowered.state_writes.items():
        writes.setdefault(w, set()).add(key)
    out: dict[int, int] = {}
    for i, k in enumerate(lowered.kernels):
        for r, w in k.inplace:
            buf = lowered.buffers[r]
            if buf.kind == "state" and buf.key in writes.get(w, ()) and last.get(r) == i \
                    and first.get(w) == i and buf.nbytes == lowered.buffers[w].nbytes:
                out[w] = r
    return out


def _inplace_slots(lowered: Lowered, nbytes: dict[int, int], first: dict[int, int],
                   last: dict[int, int]) -> dict[int, int]:
    """buffer -> the buffer whose memory it takes: a kernel's in-place pair (read, write) when
    that kernel is the read's last use and the write's first (the cross-entropy gradient takes
    the logits' memory, a residual add its input's). Chains resolve to their first buffer."""
    share: dict[int, int] = {}
    for i, k in enumerate(lowered.kernels):
        for r, w in k.inplace:
            if r in nbytes and w in nbytes and r != w and last.get(r) == i \
                    and first.get(w) == i and w not in share and nbytes[r] == nbytes[w]:
                share[w] = share.get(r, r)
    return share


def _lowest_fit(items: list[tuple[int, int, int, int]], s: int, e: int, size: int,
                align: int) -> int:
    """The lowest offset where `size` bytes live over kernels [s, e] overlap nothing placed.
    `items`: (offset, end offset, first kernel, last kernel), sorted: walked in address order,
    it stops at the first gap that fits instead of sorting the live ones on every call."""
    off = 0
    for lo, hi, ps, pe in items:
        if pe < s or e < ps:
            continue
        if off + size <= lo:
            break
        off = max(off, _round_up(hi, align))
    return off


def plan_barriers(lowered: Lowered, mem: MemoryPlan, policy: str = "hazard") -> list[bool]:
    """barrier[i]: whether kernel i must wait for the kernels before it. "hazard": only where
    it touches bytes written (or writes bytes read) since the last barrier; "all": before every
    kernel (kernels never overlap)."""
    if policy == "all":
        return [True] * len(lowered.kernels)

    def ranges(ids: list[int]) -> list[tuple]:
        out = []
        for b in ids:
            b = mem.state_alias.get(b, b)  # written in place: the state's own memory
            if b in mem.offsets:
                o = mem.offsets[b]
                out.append((("pool", mem.pool_of[b]), o, o + lowered.buffers[b].nbytes))
            else:
                out.append((b, 0, 1))
        return out

    # pending ranges per memory (a pool, or a buffer of its own): a range is compared only
    # with those in the same memory
    pend_r: dict = {}
    pend_w: dict = {}
    barrier = []
    for k in lowered.kernels:
        r, w = ranges(k.reads), ranges(k.writes)
        hazard = any(_hits(pend_w, x) for x in r) or \
            any(_hits(pend_w, x) or _hits(pend_r, x) for x in w)
        barrier.append(hazard)
        if hazard:
            pend_r, pend_w = {}, {}
        for pend, new in ((pend_r, r), (pend_w, w)):
            for where, lo, hi in new:
                pend.setdefault(where, []).append((lo, hi))
    return barrier


def _hits(pending: dict, x: tuple) -> bool:
    """Whether range x = (memory, lo, hi) overlaps a pending range in the same memory."""
    _, lo, hi = x
    return any(lo < h and o < hi for o, h in pending.get(x[0], ()))
