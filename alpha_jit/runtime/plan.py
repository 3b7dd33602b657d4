"""The plan: where every temporary lives (a memory arena with reuse) and where barriers go.

Liveness is measured in kernel positions: a temporary is live from the kernel that writes it
to the last kernel that reads it (values leaving the step live to the end). Offsets are given
greedily, largest first, to the lowest address not overlapping a live-at-the-same-time value,
so the arena's peak size is known at compile time. A barrier goes before a kernel only when it
touches bytes that an earlier kernel since the last barrier wrote (or writes bytes one read).
"""

from __future__ import annotations

from dataclasses import dataclass

from alpha_jit.codegen_spirv.lower import Lowered


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass
class MemoryPlan:
    offsets: dict[int, int]  # temp buffer id -> byte offset in the arena
    arena_bytes: int
    intervals: dict[int, tuple[int, int]]  # temp buffer id -> (first, last) kernel position
    naive_bytes: int  # what the temporaries would take without reuse

    def format(self) -> str:
        return (f"arena: {self.arena_bytes / 2**20:.2f} MiB for {len(self.offsets)} "
                f"temporaries (without reuse {self.naive_bytes / 2**20:.2f} MiB)")


def plan_memory(lowered: Lowered, align: int = 256) -> MemoryPlan:
    temps = {b.id: b for b in lowered.buffers.values() if b.kind == "temp"}
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
    intervals = {b: (first.get(b, 0), last.get(b, end)) for b in temps}
    placed: list[tuple[int, int, int, int]] = []  # (start, end, offset, size)
    offsets: dict[int, int] = {}
    naive = 0
    for b in sorted(temps, key=lambda b: (-temps[b].nbytes, b)):
        size = _round_up(temps[b].nbytes, align)
        naive += size
        s, e = intervals[b]
        busy = sorted((o, o + sz) for ps, pe, o, sz in placed if not (pe < s or e < ps))
        off = 0
        for lo, hi in busy:
            if off + size <= lo:
                break
            off = max(off, _round_up(hi, align))
        offsets[b] = off
        placed.append((s, e, off, size))
    arena = max((o + sz for _, _, o, sz in placed), default=0)
    return MemoryPlan(offsets, arena, intervals, naive)


def plan_barriers(lowered: Lowered, mem: MemoryPlan, policy: str = "hazard") -> list[bool]:
    """barrier[i]: whether kernel i must wait for the kernels before it. "hazard": only where
    it touches bytes written (or writes bytes read) since the last barrier; "all": before every
    kernel (kernels never overlap)."""
    if policy == "all":
        return [True] * len(lowered.kernels)

    def ranges(ids: list[int]) -> list[tuple]:
        out = []
        for b in ids:
            if b in mem.offsets:
                o = mem.offsets[b]
                out.append(("arena", o, o + lowered.buffers[b].nbytes))
            else:
                out.append((b, 0, 1))
        return out

    def overlap(a: tuple, b: tuple) -> bool:
        return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]

    pend_r: list[tuple] = []
    pend_w: list[tuple] = []
    barrier = []
    for k in lowered.kernels:
        r, w = ranges(k.reads), ranges(k.writes)
        hazard = any(overlap(x, y) for x in r for y in pend_w) or \
            any(overlap(x, y) for x in w for y in pend_w + pend_r)
        barrier.append(hazard)
        if hazard:
            pend_r, pend_w = [], []
        pend_r += r
        pend_w += w
    return barrier
