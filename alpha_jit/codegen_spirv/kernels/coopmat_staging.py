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
        self.regs = [kb.var("u32x4" if self.vector else elem) for _ in self.slots]
        # column sums of b (raw values): per slot, one per column the slot covers
        cols = self.width if (self.vector and not self.k_major) else 1
        self.csums = [[kb.var("f32", 0.0) for _ in range(cols)] for _ in self.slots] \
            if colsum else []
        self._zero = kb.null("u32x4") if self.vector else \
            (kb.to_bf16n(kb.f32(0.0)) if elem == "bf16n" else kb.cast(kb.f32(0.0), elem))

    # -- global -> registers -------------------------------------------------------------
    def fetch(self, k0: Value, k_hi: Value) -> None:
        """Load the K tile from k0 into the registers (zeros from k_hi on)."""
        kb, k = self.kb, self.k
        for si, (kk, _o, _sidx, addr, _guard) in enumerate(self.slots):
            kg = k0 + kk
            ok = kg < k_hi
            at = addr + kb.fmin(kg, k - self.width if self.k_major else k - 1) \
                * _u(kb, self.lay.s_k)
            raw, wide = self._load(at)
            self.regs[si].set(kb.select(ok, raw, self._zero))
            for j, cs in enumerate(self.csums[si] if self.csums else []):
                vals = wide if len(self.csums[si]) > 1 else [_sum(wide)]
                cs.set(cs.get() + kb.select(ok, vals[j], 0.0))

    def _load(self, at: Value) -> tuple[Value, list[Value]]:
        """(register value, the elements widened to f32, for column sums) at element `at`."""
        kb = self.kb
        if not self.vector:
            raw = self.src.load_raw(at)
            wide = [kb.from_bf16n(raw) if raw.dtype == "bf16n" else kb.cast(raw, "f32")] \
                if self.csums else []
            return (kb.to_bf16n(raw) if self.lay.rnd is not None else raw), wide
        if self.lay.rnd is None:  # eight 16-bit elements, packed two per word
            vec = self.src.load_raw(at >> 3)
            wide = [self._half(kb.extract(vec, i // 2), i % 2) for i in range(_VEC)] \
                if self.csums else []
            return vec, wide
        # f32 data the graph cast to bf16: two 16-byte loads, rounded as the cast did
        q = at >> 2
        f = [kb.extract(self.src.load_raw(q + h), i) for h in (0, 1) for i in range(4)]
        bits = [kb.bf16_bits(x) for x in f]
        words = [bits[2 * i] | (bits[2 * i + 1] << 16) for i in range(4)]
        return kb.vector("u32x4", words), f

    def _half(self, word: Value, hi: int) -> Value:
        """Element `hi` (0: low half) of a packed word, as f32."""
        kb = self.kb
        if self.elem == "bf16n":
            return kb.bitcast(word & 0xFFFF0000 if hi else word << 16, "f32")
        h = kb.cast(word >> 16 if hi else word & 0xFFFF, "u16")
        return kb.cast(kb.bitcast(h, "f16"), "f32")

    # -- registers -> shared -> fragments ---------------------------------------------------
    def stash(self) -> None:
        """Registers to the shared tile (the caller puts barriers around it)."""
        for (_kk, _o, sidx, _addr, guard), reg in zip(self.slots, self.regs, strict=True):
            with self.kb.when(guard):
                self.sh.store(sidx, reg.get())

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
        for (kk, o, _sidx, _addr, guard), sums in zip(self.slots, self.csums, strict=True):
            if len(sums) > 1:  # a row of 8 columns
                out += [(guard, kk * tile + o + j, s.get()) for j, s in enumerate(sums)]
            else:  # 8 k of one column, summed: the other 7 places hold 0
                out.append((guard, kk * tile + o, sums[0].get()))
                out += [(guard, (kk + j) * tile + o, 0.0) for j in range(1, self.width)]
        return out


def _sum(vals: list[Value]) -> Value:
    """The sum of kernel Values, left to right (no 0 + first term)."""
    return functools.reduce(operator.add, vals)
