"""Cooperative-matrix fragments element by element: the probed lane layout, and what kernels
do with it (row and column of each element, reductions along rows, an accumulator reused as
an A operand without a trip through shared memory).

Why: a flash-attention kernel multiplies S = q k^T on tensor cores, then needs each row's
maximum and sum and an elementwise exp before P = exp(S - m) multiplies v. With fragments
opaque, every subgroup stored S to shared memory, let lanes do the softmax there and loaded
P back (the H200's attention kernels spent most of their time in those round trips and
barriers). SPV_KHR_cooperative_matrix lets a lane read and write its own elements of a
fragment (OpCompositeExtract / Insert with index < the fragment's length) but leaves which
cells they are to the implementation. So we ask the device once: a probe kernel loads a
fragment whose cell (r, c) holds r * cols + c and writes what each lane holds
(`probe_binary`, run by the runtime when it opens a device, stored in
`Capabilities.fragment_layouts`).

`analyse` turns a probed layout into a `RowMap` when it has the structure the kernels rely
on: row(lane, e) = row_base[e] ^ L(lane) with L linear in the lane's bits (the same for
columns), so a lane computes its rows and columns with a few integer ops, and the lanes
holding one row are a coset of L's kernel, so a row reduction is the lane's own elements of
that row then one subgroup xor-shuffle per basis mask. NVIDIA's mma layout and AMD's WMMA
accumulators both have that shape; a layout without it (or none probed) gives None and the
kernels keep their shared-memory variant. `register_softmax_map` also asks that an
accumulator's element e sit where an A fragment's element e sits, which is what lets P (an
accumulator) become an A operand by moving elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np

from alpha_jit.runtime.caps import FragmentLayout

from . import coopmat
from .dsl import KernelBuilder, Value, cap
from .kernel import Dispatch, KernelBinary, KernelSpec

_MAX_LENGTH = 64  # elements per lane the probe can report (16 x 16 over 4+ lanes)
_PROBED = (("f32", "acc"), ("bf16", "a"), ("f16", "a"))
_DSL_ELEM = {"bf16": "bf16n", "f16": "f16", "f32": "f32"}


# -- probing ----------------------------------------------------------------------------------

def probe_binary(caps: object, elem: str, use: str, rows: int = 16, cols: int = 16
                 ) -> KernelBinary:
    """One subgroup loads the fragment whose cell (r, c) holds r * cols + c from shared memory
    and writes, per lane, the cell index of each of its elements to out[lane * 64 + e]; lane
    0 writes the fragment's length to out[lanes * 64]."""
    lanes = coopmat.subgroup_size(caps)
    assert lanes is not None
    assert rows * cols <= 256, "cell indices above 256 are not exact in bf16"
    dsl = _DSL_ELEM[elem]
    spec = KernelSpec("fragment_probe", f"fragment_probe_{elem}_{use}",
                      (("elem", elem), ("use", use), ("rows", rows), ("cols", cols)))
    kb = KernelBuilder(spec.name, lanes, caps)
    coopmat.enable(kb, *({dsl} - {"f32"}))
    out = kb.buffer("out", "u32", writable=True)
    cells = rows * cols
    sh = kb.shared(dsl, cells)
    lane = kb.subgroup_invocation_id()
    with kb.loop(lane, cells, lanes) as i:
        v = kb.cast(i, "f32")
        sh.store(i, kb.to_bf16n(v) if dsl == "bf16n" else kb.cast(v, dsl))
    kb.barrier()
    frag = coopmat.Frag(kb, dsl, use, rows, cols)
    x = frag.load(sh, kb.u32(0), cols)
    length = Value(kb, kb.m.emit("OpCooperativeMatrixLengthKHR", kb.type("u32"),
                                 frag.type_id), "u32")
    var = kb.m.emit("OpVariable", kb.ptr_type("Function", frag.type_id), "Function")
    kb.m.emit("OpStore", var, x.id)
    ptr_t = kb.ptr_type("Function", kb.type(dsl))
    with kb.loop(kb.u32(0), kb.fmin(length, kb.u32(_MAX_LENGTH)), 1,
                 max_trips=_MAX_LENGTH) as e:
        el = Value(kb, kb.m.emit("OpLoad", kb.type(dsl),
                                 kb.m.emit("OpAccessChain", ptr_t, var, e)), dsl)
        f = kb.from_bf16n(el) if dsl == "bf16n" else kb.cast(el, "f32")
        out.store(lane * _MAX_LENGTH + e, kb.cast(f, "u32"))
    with kb.if_(lane == 0):
        out.store(kb.u32(lanes * _MAX_LENGTH), length)
    notes: dict = {}
    if cap(caps, "subgroup_size_control", False):
        notes["required_subgroup_size"] = lanes
    return kb.binary(spec, [Dispatch((1, 1, 1))], notes=notes)


def layout_from_words(words: np.ndarray, elem: str, use: str, lanes: int, rows: int = 16,
                      cols: int = 16) -> FragmentLayout | None:
    """The layout a probe wrote (None where the length or the cells make no sense)."""
    length = int(words[lanes * _MAX_LENGTH])
    if not 0 < length <= _MAX_LENGTH or length * lanes < rows * cols:
        return None
    got = words[:lanes * _MAX_LENGTH].reshape(lanes, _MAX_LENGTH)[:, :length]
    if int(got.max()) >= rows * cols:
        return None
    return FragmentLayout(elem, use, rows, cols, lanes, tuple(int(v) for v in got.ravel()))


def probe(device: object) -> tuple[FragmentLayout, ...]:
    """The layouts of the fragments the kernels take apart, probed on an open device (empty
    without cooperative matrices)."""
    from alpha_jit.runtime.testing import run_kernel

    caps = device.caps  # type: ignore[attr-defined]
    lanes = coopmat.subgroup_size(caps)
    elems = [e for e in ("bf16", "f16") if coopmat.supported(caps, _DSL_ELEM[e])]
    if lanes is None or not elems:
        return ()
    found = []
    for elem, use in _PROBED:
        if elem != "f32" and elem not in elems:
            continue
        binary = probe_binary(caps, elem, use)
        (words,) = run_kernel(binary, [], [((lanes * _MAX_LENGTH + 1,), np.uint32)], device)
        layout = layout_from_words(words, elem, use, lanes)
        if layout is not None:
            found.append(layout)
    return tuple(found)


# -- analysis -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Affine:
    """f(lane, e) = base[e] ^ XOR of lane_bits[b] over the set bits b of lane."""

    base: tuple[int, ...]
    lane_bits: tuple[int, ...]

    def at(self, lane: int, e: int) -> int:
        return self.base[e] ^ _xor_bits(self.lane_bits, lane)


def _xor_bits(bits: tuple[int, ...], lane: int) -> int:
    return reduce(lambda a, b: a ^ b, (v for b, v in enumerate(bits) if lane >> b & 1), 0)


def _fit(table: np.ndarray) -> Affine | None:
    """table[lane, e] as an Affine, or None where it is not one."""
    lanes, length = table.shape
    base = tuple(int(v) for v in table[0])
    bits = []
    for b in range(lanes.bit_length() - 1):
        diff = table[1 << b] ^ table[0]
        if not (diff == diff[0]).all():
            return None
        bits.append(int(diff[0]))
    f = Affine(base, tuple(bits))
    ok = all(f.at(ln, e) == table[ln, e] for ln in range(lanes) for e in range(length))
    return f if ok else None


@dataclass(frozen=True)
class RowMap:
    """What a kernel needs to take an accumulator apart: each element's row and column, the
    classes of a lane's elements that share a row, and the xor masks that join the lanes
    holding one row."""

    length: int
    lanes: int
    row: Affine
    col: Affine
    classes: tuple[tuple[int, ...], ...]  # element indices per row the lane holds
    masks: tuple[int, ...]  # xor-shuffle basis of the lanes that share a row

    @property
    def pivots(self) -> int:
        """Each mask's highest bit: masks are added in increasing order, so those bits differ,
        and each set of lanes holding a row has exactly one lane with all of them clear (its
        first), the one that writes the row's statistics."""
        return reduce(lambda a, m: a | 1 << (m.bit_length() - 1), self.masks, 0)

    def cls(self, e: int) -> int:
        return next(i for i, c in enumerate(self.classes) if e in c)


def analyse(layout: FragmentLayout | None) -> RowMap | None:
    """The RowMap of an accumulator layout, or None where its rows and columns are not affine
    in the lane or a row reduction by xor-shuffles would not cover exactly its row."""
    if layout is None or layout.lanes & (layout.lanes - 1):
        return None
    n = layout.length
    cells = np.array(layout.cells, dtype=np.int64).reshape(layout.lanes, n)
    if sorted(cells.ravel().tolist()) != list(range(layout.rows * layout.cols)):
        return None  # replicated or missing cells: not an accumulator we can take apart
    row, col = _fit(cells // layout.cols), _fit(cells % layout.cols)
    if row is None or col is None:
        return None
    kernel = [m for m in range(layout.lanes) if _xor_bits(row.lane_bits, m) == 0]
    masks: list[int] = []
    span = {0}
    for m in kernel:
        if m not in span:
            masks.append(m)
            span |= {s ^ m for s in span}
    classes: dict[int, list[int]] = {}
    for e in range(n):
        classes.setdefault(row.base[e], []).append(e)
    for ln in range(layout.lanes):
        for es in classes.values():
            r = row.at(ln, es[0])
            got = {int(cells[ln ^ m, e]) for m in span for e in es}
            want = {r * layout.cols + c for c in range(layout.cols)}
            if got != want:
                return None
    return RowMap(n, layout.lanes, row, col, tuple(tuple(v) for v in classes.values()),
                  tuple(masks))


def register_softmax_map(caps: object, elem: str) -> RowMap | None:
    """The accumulator's RowMap where a 16 x 16 f32 accumulator's elements sit exactly where
    the A fragment of `elem` ("bf16n" or "f16") has them, so a probability tile computed in
    an accumulator multiplies as A after an element-wise conversion; else None."""
    getter = getattr(caps, "fragment_layout", None)
    if getter is None or not cap(caps, "subgroup_shuffle", False):
        return None
    acc, a = getter("f32", "acc"), getter(coopmat.CAPS_NAME[elem], "a")
    if acc is None or a is None or acc.cells != a.cells:
        return None
    return analyse(acc)


# -- emission -----------------------------------------------------------------------------------

class Lanes:
    """The lane's rows and columns of a RowMap in a kernel, and row reductions."""

    def __init__(self, kb: KernelBuilder, rm: RowMap, lane: Value):
        self.kb, self.rm = kb, rm
        self._row_lane = self._lane_part(rm.row.lane_bits, lane)
        self._col_lane = self._lane_part(rm.col.lane_bits, lane)
        self.leader = (lane & rm.pivots) == 0  # the lane that writes a row's statistics

    def _lane_part(self, bits: tuple[int, ...], lane: Value) -> Value:
        kb = self.kb
        parts = [kb.select((lane & (1 << b)) != 0, kb.u32(v), kb.u32(0))
                 for b, v in enumerate(bits) if v]
        return reduce(lambda a, b: a ^ b, parts, kb.u32(0))

    def row(self, cls: int) -> Value:
        """The row (0..15) of the lane's elements of class `cls`."""
        return self._row_lane ^ self.rm.row.base[self.rm.classes[cls][0]]

    def element_row(self, e: int) -> Value:
        """The row (0..15) of the lane's element e."""
        return self._row_lane ^ self.rm.row.base[e]

    def col(self, e: int) -> Value:
        """The column (0..15) of the lane's element e."""
        return self._col_lane ^ self.rm.col.base[e]

    def reduce(self, combine, x: Value) -> Value:
        """combine(x, x of the other lanes holding the row), over all of them."""
        for m in self.rm.masks:
            other = self.kb.op("OpGroupNonUniformShuffleXor", x.dtype, "Subgroup", x,
                               self.kb.u32(m))
            x = combine(x, other)
        return x


def elements(frag: coopmat.Frag, x: coopmat.Fragment, length: int) -> list[Value]:
    """The lane's elements of fragment x (index order)."""
    kb = frag.kb
    return [Value(kb, kb.m.emit("OpCompositeExtract", kb.type(frag.elem), x.id, e), frag.elem)
            for e in range(length)]


def from_elements(frag: coopmat.Frag, values: list[Value]) -> coopmat.Fragment:
    """The fragment whose lane elements are `values` (of the fragment's element type)."""
    kb = frag.kb
    fid = kb.m.emit("OpUndef", frag.type_id)
    for e, v in enumerate(values):
        fid = kb.m.emit("OpCompositeInsert", frag.type_id, v, fid, e)
    return coopmat.Fragment(frag, fid)


def scale_rows(frag: coopmat.Frag, x: coopmat.Fragment, per_element: list[Value]
               ) -> coopmat.Fragment:
    """x with element e multiplied by per_element[e] (an f32 accumulator)."""
    return from_elements(frag, [v * s for v, s in zip(elements(frag, x, len(per_element)),
                                                      per_element, strict=True)])
