"""How one operand of the cooperative-matrix GEMM gets from global memory to its fragments.

Why: a tensor-core GEMM is fed, not computed: the fragments multiply faster than scalar
loads can stage them. This is where an operand tile (tile x bk of a, bk x tile of b, the
"outer" axis being m or n) is read from its strided view, optionally rounded to bf16 and
summed by column, and written to shared memory in a layout the fragments load from.

Two ways, chosen per operand at generation time:
- **vector**: where the view's contiguous axis is k or the outer axis and offsets, strides and
  that axis's length are multiples of 8 elements, each thread moves 8 elements (16 bytes, or
  two 16-byte f32 loads rounded to bf16) per load and per shared store. The shared tile keeps
  the global layout (k-major rows, or outer-major rows); a fragment whose rows run the other
  way loads column-major. Vectors are never partial: they lie wholly inside or outside the
  matrix, those outside are zero (past K) or never stored (past M or N).
- **scalar**: any strides: one element per load, a k-major tile for a and an n-major one for b.

Either way the next K tile is loaded into registers while the current one is multiplied
(`fetch`, then `stash` after the barrier), and rows are padded by 8 elements (16 bytes).
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

from .. import coopmat
from ..dsl import Buffer, KernelBuilder, Value
from .matmul import _u

_PAD = 8  # elements of padding per shared row: rows stay 16-byte aligned
_VEC = 8  # 16-bit elements per 16-byte vector


@dataclass(frozen=True)
class Layout:
    """An operand's view: element offset, batch stride, outer (m or n) stride, k stride, the
    outer length and tile, and rounding on load."""

    off: int
    sb: int
    s_outer: int
    s_k: int
    size: int
    tile: int
    rnd: str | None

    def vectorizable(self, k: int, batch: int) -> bool:
        aligned = self.off % _VEC == 0 and (batch == 1 or self.sb % _VEC == 0)
        if self.s_k == 1:
            return aligned and self.s_outer % _VEC == 0 and k % _VEC == 0
        if self.s_outer == 1:
            return aligned and self.s_k % _VEC == 0 and self.size % _VEC == 0
        return False


class Staged:
    """One operand ("a" or "b") of one workgroup: staging slots, prefetch registers, the
    shared tile and fragment loads from it."""

    def __init__(self, kb: KernelBuilder, name: str, buf: Buffer, lay: Layout, bk: int,
                 threads: int, elem: str, tid: Value, g0: Value, bi: Value, k: int,
                 batch: int, colsum: bool):
        self.kb, self.name, self.lay, self.bk, self.elem, self.k = kb, name, lay, bk, elem, k
        self.vector = lay.vectorizable(k, batch)
        # shared rows run along k (k-major) or along the outer axis (outer-major)
        self.k_major = lay.s_k == 1 if self.vector else name == "a"
        self.ld = (bk if self.k_major else lay.tile) + _PAD
        rows = lay.tile if self.k_major else bk
        self.width = _VEC if self.vector else 1  # elements per slot
        self.sh = kb.shared("u32x4", rows * self.ld // _VEC) if self.vector \
            else kb.shared(elem, rows * self.ld)
        if self.vector and lay.rnd is None:
            self.src = kb.buffer_view(buf, "u32x4")
        elif self.vector:
            self.src = kb.buffer_view(buf, "f32x4")
        else:
            self.src = buf
        base = _u(kb, lay.off) + bi * _u(kb, lay.sb) if lay.sb else _u(kb, lay.off)
        per_row = (bk if self.k_major else lay.tile) // self.width
        total = rows * per_row
        self.slots = []  # (kk, o, shared index, k-independent address, guard)
        for r in range(math.ceil(total / threads)):
            v = tid + r * threads
            rs, c = v / per_row, (v % per_row) * self.width
            kk, o = (c, rs) if self.k_major else (rs, c)
            g = g0 + o
            partial = (r + 1) * threads > total  # idle lanes of the last round: o >= tile
            if lay.size % lay.tile or partial:  # past M or N: never stored; a valid address
                g = kb.fmin(g, lay.size - (1 if self.k_major else self.width))
            addr = base + g * _u(kb, lay.s_outer) if lay.s_outer else base
            sidx = (o * self.ld + kk) if self.k_major else (kk * self.ld + o)
            if self.vector:
                sidx = sidx / _VEC
            guard = v < total if (r + 1) * threads > total else None
            self.slots.append((kk, o, sidx, addr, guard))
        # the loads as they arrive: conversion and column sums wait for `stash`, so the
        # next tile's loads stay in flight during the math (using them in `fetch` stalled
        # there until they landed)
        raw = ["u32x4"] if self.vector and lay.rnd is None else \
            ["f32x4", "f32x4"] if self.vector else [self.src.storage]
        self.regs = [[kb.var(dt) for dt in raw] for _ in self.slots]
        self._ragged = k % bk != 0  # else every tile lies wholly inside K (slices end on tiles)
        # column sums of b (raw values): per slot, one per column the slot covers. Unguarded
        # slots of an n-major tile whose rows the threads cover whole cover the same columns
        # every round: they add into one set (8 registers, not 8 per slot)
        cols = self.width if (self.vector and not self.k_major) else 1
        shared = cols > 1 and threads % per_row == 0
        self.csums, self._cs_first = [], []
        for si, (*_, guard) in enumerate(self.slots if colsum else []):
            if shared and guard is None and si > 0 and self.slots[0][-1] is None:
                self.csums.append(self.csums[0])
                self._cs_first.append(False)
            else:
                self.csums.append([kb.var("f32", 0.0) for _ in range(cols)])
                self._cs_first.append(True)

    # -- global -> registers -------------------------------------------------------------
    def fetch(self, k0: Value) -> None:
        """Load the K tile from k0 into the registers (its rows past K clamped: `stash`
        zeroes them)."""
        kb, k = self.kb, self.k
        for si, (kk, _o, _sidx, addr, _guard) in enumerate(self.slots):
            at = addr + kb.fmin(k0 + kk, k - self.width if self.k_major else k - 1) \
                * _u(kb, self.lay.s_k)
            if not self.vector:
                loads = [self.src.load_raw(at)]
            elif self.lay.rnd is None:  # eight 16-bit elements, packed two per word
                loads = [self.src.load_raw(at >> 3)]
            else:  # f32 data the graph cast to bf16: two 16-byte loads
                loads = [self.src.load_raw((at >> 2) + h) for h in (0, 1)]
            for reg, v in zip(self.regs[si], loads, strict=True):
                reg.set(v)

    def _convert(self, vals: list[Value]) -> tuple[Value, list[Value]]:
        """(what the shared tile holds, the elements as f32 for column sums) of one slot's
        loads: rounded as the cast did where the operand is f32 data cast to bf16."""
        kb = self.kb
        if not self.vector:
            raw = vals[0]
            wide = [raw if raw.dtype == "f32" else kb.from_bf16n(raw) if raw.dtype == "bf16n"
                    else kb.cast(raw, "f32")] if self.csums else []
            return (kb.to_bf16n(raw) if self.lay.rnd is not None else raw), wide
        if self.lay.rnd is None:
            wide = [self._half(kb.extract(vals[0], i // 2), i % 2) for i in range(_VEC)] \
                if self.csums else []
            return vals[0], wide
        f = [kb.extract(v, i) for v in vals for i in range(4)]
        bits = [kb.bf16_bits(x) for x in f]
        return kb.vector("u32x4", [bits[2 * i] | (bits[2 * i + 1] << 16) for i in range(4)]), f

    def _half(self, word: Value, hi: int) -> Value:
        """Element `hi` (0: low half) of a packed word, as f32."""
        kb = self.kb
        if self.elem == "bf16n":
            return kb.bitcast(word & 0xFFFF0000 if hi else word << 16, "f32")
        h = kb.cast(word >> 16 if hi else word & 0xFFFF, "u16")
        return kb.cast(kb.bitcast(h, "f16"), "f32")

    # -- registers -> shared -> fragments ---------------------------------------------------
    def stash(self, k0: Value, k_hi: Value) -> None:
        """The K tile from k0 (in the registers) to the shared tile, zeros from k_hi on, its
        column sums added (the caller puts barriers around it)."""
        kb = self.kb
        for si, (kk, _o, sidx, _addr, guard) in enumerate(self.slots):
            vals = [r.get() for r in self.regs[si]]
            if self._ragged:
                ok = k0 + kk < k_hi
                vals = [kb.select(ok, v, kb.null(v.dtype)) for v in vals]
            packed, wide = self._convert(vals)
            for j, cs in enumerate(self.csums[si] if self.csums else []):
                cs.set(cs.get() + (wide[j] if len(self.csums[si]) > 1 else _sum(wide)))
            with kb.when(guard):
                self.sh.store(sidx, packed)

    def fragment(self, frag: coopmat.Frag, o0: Value, kk: int) -> coopmat.Fragment:
        """The fragment at outer offset o0 (a multiple of 16) and k offset kk of the tile."""
        column_major = (not self.k_major) if self.name == "a" else self.k_major
        unit = _VEC if self.vector else 1
        if self.k_major:
            idx = o0 * (self.ld // unit) + kk // unit
        else:
            idx = o0 / unit + (kk * self.ld) // unit
        return frag.load(self.sh, idx, self.ld // unit, column_major)

    def colsum_entries(self) -> list[tuple[Value | None, Value, object]]:
        """(guard, index in a bk x tile array, f32 value or 0.0) of every column-sum partial
        of this workgroup, covering the array exactly once."""
        tile, out = self.lay.tile, []
        for (kk, o, _sidx, _addr, guard), sums, first in zip(self.slots, self.csums,
                                                             self._cs_first, strict=True):
            if len(sums) > 1:  # a row of 8 columns (held by an earlier slot: zeros here)
                out += [(guard, kk * tile + o + j, s.get() if first else 0.0)
                        for j, s in enumerate(sums)]
            else:  # 8 k of one column, summed: the other 7 places hold 0
                out.append((guard, kk * tile + o, sums[0].get()))
                out += [(guard, (kk + j) * tile + o, 0.0) for j in range(1, self.width)]
        return out


def _sum(vals: list[Value]) -> Value:
    """The sum of kernel Values, left to right (no 0 + first term)."""
    return functools.reduce(operator.add, vals)
